"""Every command and Python snippet of the README and of the guides in docs/ runs. A ```bash line that
starts with `hetero ` runs as written except that it is shrunk for speed: tiny models, synthetic data,
one epoch, small demo limits. Lines in ```text (or ```sh) blocks are illustrations that cannot run here
(a second machine, a device over SSH, a kill) and are not run."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
SUBCOMMANDS = {"train-cloud", "train-edge", "export", "evaluate", "demo", "data", "models", "cache", "import-cloud",
               "fit-classifier", "bench", "devices", "pack-runner", "verify", "train-supernet", "search"}
SHRINK = {
    "train-cloud": ["--data", "synthetic", "--limit", "400", "--epochs", "1"],
    "train-edge": ["--data", "synthetic", "--limit", "400", "--epochs", "1"],
    "evaluate": ["--data", "synthetic", "--quiet"],
    "export": ["--check-samples", "200", "--data", "synthetic"],  # gallery and calibration: the edge's own data
    "bench": ["--iters", "5", "--quiet"],
    "fit-classifier": ["--data", "synthetic", "--epochs", "1", "--quiet"],
    "demo": ["--train-limit", "500", "--gallery-limit", "1000", "--query-limit", "200", "--edge-epochs", "1", "--quiet",
             "--edge-model", "test_mobilenet", "--gates", "loose.toml"],
    "verify": ["--data", "synthetic", "--quiet", "--no-latency", "--gates", "loose.toml"],
    "train-supernet": ["--data", "synthetic", "--limit", "200", "--val-size", "100", "--epochs", "1", "--n-random", "0",
                       "--quiet"],
    "search": ["--data", "synthetic", "--population", "2", "--generations", "0", "--quiet"],
}
# one-epoch tiny models miss the project's default gates (gap, flips): the shrunk runs check that the
# commands work, with gates loose enough to pass; tests/app/test_verify.py tests the gates themselves
LOOSE_GATES = "[all]\ncompatibility_criterion = false\nmax_gap_to_paragon = 1.0\nmax_negative_flip_rate = 1.0\n" + "".join(
    f"[precision.{p}]\nmin_drift_cosine = 0.0\nmin_top10_overlap = 0.0\n" for p in ("fp32", "fp16", "int8"))
SHRINK_TRAIN_CLOUD = ["--cloud-epochs", "1", "--cloud-model", "test_resnet"]  # demo --train-cloud
MODELS = {"resnet20": "test_resnet", "resnet32": "test_resnet", "mobilenet_w050": "test_mobilenet",
          "resnet18": "mobilenet_v3_small",  # the BYO example's torchvision model, shrunk too
          "tv:resnet50": "tv:resnet18", "224": "32"}  # the real-resolution guide's cloud and size


# one fresh process runs every command in order, each in its own directory, as `hetero ...` would (the
# console script itself is exercised by test_integration and test_cli): one torch import instead of one
# per command
RUN_ALL = """
import json, os, sys
from hetero.app.cli import main
for where, cwd, args in json.loads(sys.argv[1]):
    os.chdir(cwd)
    code = main(args)
    if code != 0:
        sys.exit(f"{where}: exit status {code}: hetero {' '.join(args)}")
    print("command ok: hetero", *args, flush=True)
"""


def write_byo_weights(cwd: Path) -> None:
    """The weights file the BYO import-cloud line names, for the (shrunk) torchvision model."""
    import torchvision
    from safetensors.torch import save_file

    net = torchvision.models.get_model(MODELS["resnet18"], weights=None, num_classes=128)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(cwd / "r18.safetensors"))


def prepare(cwd: Path, text: str) -> None:
    """What the commands of one page expect to find in their working directory."""
    cwd.mkdir(parents=True, exist_ok=True)
    (cwd / "loose.toml").write_text(LOOSE_GATES)
    if "r18.safetensors" in text:
        write_byo_weights(cwd)


def blocks(lang: str, path: Path = README) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", path.read_text(), flags=re.S | re.M)


def cli_commands(path: Path = README) -> list[list[str]]:
    cmds = []
    for block in blocks("bash", path):
        for line in block.splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("hetero "):
                cmds.append(line.split())
    return cmds


def shrunk(cmd: list[str]) -> list[str]:
    args = [MODELS.get(a, a) for a in cmd[1:]] + SHRINK.get(cmd[1], [])
    if "--train-cloud" in cmd:
        args += SHRINK_TRAIN_CLOUD
    return args


def shrunk_python(code: str) -> str:
    """A Python block shrunk like the commands: synthetic data, tiny models, one epoch on 400 images."""
    code = code.replace("DATA = None", 'DATA = "synthetic"').replace('"epochs": 2}', '"epochs": 1, "limit": 400}')
    for real, tiny in MODELS.items():
        code = code.replace(f'"{real}"', f'"{tiny}"')
    return code


def run_pages(pages: list[tuple[Path, Path]]) -> None:
    """Every page's commands, each page in its directory, then its Python blocks there."""
    argv = [[path.name, str(cwd), shrunk(cmd)] for path, cwd in pages for cmd in cli_commands(path)]
    for path, cwd in pages:
        prepare(cwd, path.read_text())
    if argv:
        p = subprocess.run([sys.executable, "-c", RUN_ALL, json.dumps(argv)], capture_output=True, text=True,
                           timeout=600, env={**os.environ})
        assert p.returncode == 0, p.stderr[-2000:]  # its last line names the page and the command
        assert p.stdout.count("command ok: hetero ") == len(argv)
    for path, cwd in pages:
        for code in blocks("python", path):
            p = subprocess.run([sys.executable, "-c", shrunk_python(code)], cwd=cwd, capture_output=True, text=True,
                               timeout=300)
            assert p.returncode == 0, f"{path.name}: {p.stderr[-1500:]}"


def test_readme_shows_the_two_commands_first():
    first = blocks("bash")[0].split()
    assert first == ["make", "demo", "make", "test"]


def test_readme_has_every_command_and_links_every_guide():
    assert {c[1] for c in cli_commands()} >= SUBCOMMANDS
    text = README.read_text()
    assert DOCS and all(f"](docs/{d.name}" in text for d in DOCS)
    # one Python block, under the marker that says where the API example goes
    (snippet,) = blocks("python")
    assert re.search(r"^<!-- python-api -->\n```python\n", text, flags=re.M)


def test_docs_show_only_commands_that_run():
    """A guide's ```text block shows lines that cannot run here (a device over SSH, a run after a kill)
    or lines that run elsewhere: the README's tour or a guide's ```bash block."""
    runnable = {" ".join(c) for page in (README, *DOCS) for c in cli_commands(page)}
    for page in DOCS:
        for block in blocks("text", page) + blocks("console", page):
            lines = [line.split("#", 1)[0].strip() for line in block.splitlines()]
            lines = [" ".join(line.split()) for line in lines if line.startswith("hetero ")]
            if any("--host" in line or "--resume" in line for line in lines):
                continue
            assert not [line for line in lines if line not in runnable], f"{page.name}: {block}"


@pytest.mark.slow
def test_readme_and_docs_cli_and_snippets_run(tmp_path):
    """The README's tour, then each guide, each in a fresh directory of its own: a page's commands chain
    only to its own earlier ones. One process runs them all (one start-up of torch and the runtimes)."""
    run_pages([(README, tmp_path / "README"), *((d, tmp_path / d.stem) for d in DOCS)])
    assert (tmp_path / "README" / "runs" / "eval" / "report.json").is_file()
    assert (tmp_path / "README" / "runs" / "verify" / "report.html").is_file()
    assert (tmp_path / "training" / "runs" / "update" / "report.json").is_file()
    assert (tmp_path / "verify" / "runs" / "verify-release" / "report.html").is_file()
