"""The documentation holds together: benchmarks/README.md is what benchmarks/make_readme.py generates, the
README stays short, every relative link and anchor resolves, and the guides' gates example is valid.
(tests/test_readme.py runs the commands and snippets.)"""
import importlib.util
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def make_readme():
    spec = importlib.util.spec_from_file_location("make_readme", ROOT / "benchmarks" / "make_readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmarks_readme_is_generated_and_current():
    assert make_readme().check() is None, "benchmarks/README.md is stale: run python benchmarks/make_readme.py"


def test_benchmarks_readme_includes_every_result_under_its_script(tmp_path, capsys):
    gen = make_readme()
    text = gen.generate()
    results = sorted((ROOT / "benchmarks" / "results").glob("*.md"))
    assert results
    for md in results:
        body = md.read_text().strip().splitlines()[-1]
        assert body in text, md.name  # the file's last line, a table row or a note, is in the page
        if (ROOT / "benchmarks" / f"{md.stem}.py").exists():
            assert f"\n## {md.stem} (benchmarks/{md.stem}.py)\n" in text
    assert "\n## search_e16 (benchmarks/search.py)\n" in text  # a variant's results: its script's name
    # --check says so in one line and exits 1 on a stale page, and writes nothing
    stale = tmp_path / "README.md"
    stale.write_text(text + "a hand edit\n")
    gen.README = stale
    assert gen.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "stale" in err and "python benchmarks/make_readme.py" in err
    assert stale.read_text().endswith("a hand edit\n")


def test_readme_is_short():
    assert len((ROOT / "README.md").read_bytes()) <= 15 * 1024


def slug(title: str) -> str:
    """GitHub's anchor for a heading."""
    title = re.sub(r"`|\*\*|\[([^\]]*)\]\([^)]*\)", r"\1", title)
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    return {slug(m) for m in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


def test_every_relative_link_resolves():
    broken = []
    for page in PAGES:
        text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
        for target in LINK.findall(text):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):
                continue  # a URL
            file, _, anchor = target.partition("#")
            dest = (page.parent / file).resolve() if file else page
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_gates_examples_are_valid():
    """The README's block is the defaults (tests/app/test_verify.py); the guide's example is a valid
    gates file that changes some of them."""
    from hetero.app.verify.gates import DEFAULTS, parse_gates

    (example,) = re.findall(r"^```toml\n(.*?)^```", (ROOT / "docs" / "verify.md").read_text(), flags=re.S | re.M)
    gates = parse_gates(tomllib.loads(example))
    assert gates != parse_gates({}) and gates["precision"]["int8"] == DEFAULTS["precision"]["int8"]
