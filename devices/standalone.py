"""The torch-free standalone runner: ``python -m devices run|bench EXPORT_DIR ...`` on a device that
has only numpy and a runtime (onnxruntime, ...): a Raspberry Pi, a Jetson, a Mac.

``run`` embeds a preprocessed ``.npy`` batch, an image, a directory of images or a text file listing
images; images are decoded by :mod:`devices.images`, the decoder hetero trains with, so they are
preprocessed exactly as hetero does (Pillow, imported only then). ``bench`` times
the artifact with :func:`devices.bench.bench` and writes the latency JSON. ``pack_runner`` zips this
core into one file that runs as ``python runner.zip run|bench ...``.

Errors are one line on stderr (``error: ...``) and exit status 2. Outputs are written atomically and
durably, only to new paths or, with ``--overwrite``, over an earlier output of the same kind (see
:mod:`devices.outputs`). Standard library and numpy only, like the rest of the core.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import zipfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from devices import images
from devices.artifact import preprocess_problem
from devices.bench import bench
from devices.errors import DeviceError
from devices.images import IMAGE_EXTENSIONS, list_images
from devices.outputs import RUNNER_ZIP_COMMENT, listing_is_ours, refusal, run_refusal, write_all
from devices.profiles import profile as get_profile
from devices.profiles import runner_for
from devices.runner import RUNNERS, create_runner

PROG = "python -m devices"
# host-side modules left out of the packed runner
NOT_PACKED = frozenset({"remote.py"})
PACKED_MAIN = '''"""hetero's standalone runner: python runner.zip run|bench EXPORT_DIR ... (numpy and a runtime only)."""
import os
import sys

if sys.version_info < (3, 8):
    sys.stderr.write("error: the hetero runner needs Python 3.8 or newer, this is %d.%d\\n" % sys.version_info[:2])
    sys.exit(2)
try:
    import numpy  # noqa: F401
except ImportError:
    sys.stderr.write("error: numpy is not installed (pip install numpy)\\n")
    sys.exit(2)

from devices.__main__ import main

sys.exit(main(prog="python " + os.path.basename(sys.argv[0])))
'''


# --------------------------------------------------------------------------------------------- inputs

# characters after which str.splitlines() starts a new line: a name holding one is written quoted
_LINE_BREAKS = frozenset("\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029")
_ESCAPES = {ord("\\"): "\\\\", ord('"'): '\\"', ord("\n"): "\\n", ord("\t"): "\\t", ord("\r"): "\\r"}
_QUOTED = re.compile(r'"((?:\\x[0-9a-fA-F]{2}|\\[\\"ntr]|[^\\"])*)"')
_TOKEN = re.compile(r'\\x([0-9a-fA-F]{2})|\\([\\"ntr])|([^\\"]+)')


def quote_name(path: str | os.PathLike) -> str:
    r"""A path as one line of an image list (and in a message): as it is, unless it would not read back
    as itself (bytes that are not UTF-8, a newline or another control character, leading or trailing
    blanks, a leading ``"`` or ``#``); then in double quotes, its bytes as printable ASCII with
    ``\\``, ``\"``, ``\n``, ``\t``, ``\r`` and ``\xNN`` escapes, as git quotes unusual paths."""
    text = os.fspath(path)
    plain = (text and text == text.strip() and text[0] not in '"#'
             and not any(ord(c) < 32 or ord(c) == 127 or c in _LINE_BREAKS or 0xDC80 <= ord(c) <= 0xDCFF for c in text))
    if plain:
        return text
    return '"' + "".join(_ESCAPES.get(b, chr(b) if 32 <= b < 127 else f"\\x{b:02x}") for b in os.fsencode(text)) + '"'


def unquote_name(line: str) -> str | None:
    """The path a line of an image list names (see :func:`quote_name`); None if it is quoted badly."""
    if not line.startswith('"'):
        return line
    m = _QUOTED.fullmatch(line)
    if m is None:
        return None
    out = bytearray()
    for t in _TOKEN.finditer(m[1]):
        hexa, esc, text = t.groups()
        out += bytes([int(hexa, 16)]) if hexa else {"n": b"\n", "t": b"\t", "r": b"\r"}.get(esc, (esc or text).encode())
    return os.fsdecode(bytes(out))


def read_image_list(list_file: str | Path) -> list[Path]:
    """Image paths listed one per line (blank lines and ``#`` comments skipped); relative paths are
    relative to the list file's directory. A line in double quotes is a quoted name
    (:func:`quote_name`): the ``.txt`` that ``run`` writes reads back as the same images."""
    list_file = Path(list_file)
    try:
        lines = list_file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DeviceError(f"{list_file} is neither a .npy batch, an image nor a text file listing images") from None
    paths = []
    for i, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name = unquote_name(line)
        if name is None:
            raise DeviceError(f"{list_file}:{i}: a quoted name with a bad escape or quote: {line[:80]!r}; inside "
                              'quotes only \\\\ \\" \\n \\t \\r and \\xNN escapes are allowed')
        p = Path(name).expanduser()
        p = p if p.is_absolute() else list_file.parent / p
        if not p.is_file():
            raise DeviceError(f"{list_file}:{i}: no such image file {quote_name(name)}")
        paths.append(p)
    if not paths:
        raise DeviceError(f"{list_file} lists no images")
    return paths


def check_preprocess(pre: Any, where: str) -> dict[str, Any]:
    """The manifest's ``preprocess`` block, validated by the manifest loader's one rule
    (:func:`devices.artifact.preprocess_problem`), with numbers as the runner uses them."""
    problem = preprocess_problem(pre)
    if problem is not None:
        raise DeviceError(f"{where}: {problem}; re-run `hetero export`, or pass a preprocessed float32 .npy batch")
    return {"size": int(pre["size"]), "channels": int(pre["channels"]), "mean": [float(m) for m in pre["mean"]],
            "std": [float(v) for v in pre["std"]], "crop": None if pre.get("crop") is None else float(pre["crop"])}


def _pil():
    try:
        return images.pil()
    except images.ImageError as e:
        raise DeviceError(f"{e} (or pass a preprocessed float32 .npy batch)") from None


def load_image(path: str | Path, size: int, channels: int, crop: float | None = None) -> np.ndarray:
    """One image as uint8 [size, size, channels], decoded by :func:`devices.images.decode_image`,
    the decoder hetero's ImageFolder loader uses (16- and 32-bit images scaled, float ones refused)."""
    _pil()  # a missing Pillow with the runner's .npy alternative
    try:
        return images.decode_image(path, size, channels, crop)[0]
    except images.ImageError as e:
        raise DeviceError(str(e)) from None


def preprocess_images(paths: Sequence[str | Path], pre: dict[str, Any]) -> np.ndarray:
    """Images -> float32 [N, C, size, size]: what hetero's ``Preprocess.apply`` makes of them."""
    pre = check_preprocess(pre, "the preprocess block")
    size, channels = pre["size"], pre["channels"]
    images = np.stack([load_image(p, size, channels, pre["crop"]) for p in paths]) if len(paths) else \
        np.zeros((0, size, size, channels), np.uint8)
    mean = np.asarray(pre["mean"], dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(pre["std"], dtype=np.float32).reshape(1, -1, 1, 1)
    x = images.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)
    return np.ascontiguousarray((x - mean) / std, dtype=np.float32)


def resolve_input(spec: str | Path) -> tuple[np.ndarray | None, list[Path] | None]:
    """``(batch, None)`` for a ``.npy``; ``(None, image paths)`` for an image, a directory or a list file."""
    p = Path(spec).expanduser()
    if not p.exists():
        raise DeviceError(f"--input {spec}: no such file or directory")
    if p.is_dir():
        paths = list_images(p)
        if not paths:
            raise DeviceError(f"--input {spec}: the directory holds no images ({'/'.join(sorted(IMAGE_EXTENSIONS))})")
        return None, paths
    if p.suffix.lower() == ".npy":
        try:
            x = np.load(p, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise DeviceError(f"--input {spec}: not a readable .npy array ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})") from None
        return x, None
    if p.suffix.lower() in IMAGE_EXTENSIONS:
        return None, [p]
    return None, read_image_list(p)


# -------------------------------------------------------------------------------------------- outputs

def write_outputs(files: dict[Path, bytes | np.ndarray]) -> None:
    """Write every file durably to a temporary file beside it, then move them all into place
    (:func:`devices.outputs.write_all`): a failure, a full disk included, leaves nothing half-written."""
    for path in files:
        if not path.parent.is_dir():
            raise DeviceError(f"cannot write {path}: the directory {path.parent} does not exist")
    try:
        write_all({p: (lambda f, d=d: np.save(f, d, allow_pickle=False)) if isinstance(d, np.ndarray) else d
                   for p, d in files.items()})
    except OSError as e:
        raise DeviceError(f"cannot write {' and '.join(map(str, files))}: {e.strerror or e}") from None


def image_list(paths: Sequence[str | os.PathLike]) -> bytes:
    """The ``.txt`` that ``run`` writes beside the embeddings: line i names the image of row i, one
    :func:`quote_name` per line (UTF-8), so a name with a newline or bytes that are not UTF-8 keeps
    the rows aligned; it reads back with :func:`read_image_list`."""
    return "".join(f"{quote_name(p)}\n" for p in paths).encode("utf-8")


# ---------------------------------------------------------------------------------------- the commands

def _settings(threads: int | None, providers: Sequence[str] | None = None, **more: Any) -> dict[str, Any]:
    s = dict(more)
    if threads is not None:
        if threads < 1:
            raise DeviceError(f"--threads must be >= 1, got {threads}")
        s["threads"] = threads
    if providers:
        s["providers"] = list(providers)
    return s


def embed_export(export_dir: str | Path, inputs: str | Path | np.ndarray, *, runtime: str = "onnxruntime",
                 precision: str | None = None, fmt: str | None = None, batch_size: int = 256,
                 **settings: Any) -> tuple[np.ndarray, list[Path] | None]:
    """Embeddings of ``inputs`` (an array, a ``.npy``, an image, a directory or a list of images) and
    the image paths in row order (None for an array)."""
    if isinstance(inputs, np.ndarray):
        x, paths = inputs, None
    else:
        x, paths = resolve_input(inputs)
    with create_runner(export_dir, runtime, precision=precision, fmt=fmt, batch_size=batch_size, **settings) as r:
        if paths is None:
            return r.embed(x), None
        pre = check_preprocess(r.artifact.manifest.get("preprocess"), f"the manifest of {export_dir}")
        if paths:
            _pil()  # the Pillow hint before anything else
        # one runner batch at a time, so a large folder never sits in memory preprocessed
        chunks = [r.embed(preprocess_images(paths[i:i + r.batch_size], pre)) for i in range(0, len(paths), r.batch_size)]
        return np.concatenate(chunks) if chunks else np.zeros((0, r.artifact.dim), np.float32), paths


def bench_export(export_dir: str | Path, *, runtime: str | None = None, precision: str | None = None,
                 fmt: str | None = None, profile: str | None = None, batch_sizes: Sequence[int] = (1, 8, 32),
                 iters: int | None = None, budget_s: float | None = None, warmup: int = 10,
                 progress: bool = False, **settings: Any) -> dict[str, Any]:
    """The latency JSON of the export's artifact; a ``profile`` gives format, precision, runtime and
    settings, which explicit arguments override."""

    prof = None
    if profile:
        prof = get_profile(profile)
        if runtime is None:
            runtime, why = runner_for(prof)
            if runtime is None:
                raise DeviceError(f"profile {prof.name} cannot run here: {why}")
        fmt = fmt or prof.fmt
        precision = precision or prof.precision
        settings = {**(prof.settings if runtime == prof.runtime else {}), **settings}
    with create_runner(export_dir, runtime or "onnxruntime", precision=precision, fmt=fmt, **settings) as r:
        result = bench(r, batch_sizes, warmup=warmup, iters=iters, budget_s=budget_s, progress=progress)
    if prof is not None:
        result["profile"] = {"name": prof.name, "stands_for": prof.where, "description": prof.description}
    return result


def summary(result: dict[str, Any]) -> str:
    rows = [f"{result['runtime']} ({result['label']}), {result['artifact']['format']} {result['artifact']['precision']}",
            "batch  p50 ms    p90 ms    p99 ms    img/s"]
    for r in result["results"]:
        tp = r["throughput_img_s"]
        rows.append(f"{r['batch']:>5}  {r['p50_ms']:<9.4f} {r['p90_ms']:<9.4f} {r['p99_ms']:<9.4f} {tp if tp is None else round(tp, 1)}")
    return "\n".join(rows) + "\n"


# ---------------------------------------------------------------------------------------------- the CLI

class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage block
        raise _UsageError(f"{message} (see {self.prog} --help)")


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {v}")
    return v


def _batch_list(text: str) -> list[int]:
    try:
        sizes = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated batch sizes like 1,8,32, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected batch sizes >= 1 like 1,8,32, got {text!r}")
    return sizes


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return v


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    runtimes = ", ".join(sorted(RUNNERS))
    p = _Parser(prog=prog, description="hetero's standalone runner: embeddings and latency of an exported edge model "
                                       "with numpy and a runtime only (no torch, no hetero).")
    sub = p.add_subparsers(dest="cmd", metavar="run|bench", parser_class=_Parser)
    sub.required = True

    def common(sp):
        sp.add_argument("export_dir", metavar="EXPORT_DIR", help="directory with manifest.json (hetero export --out)")
        sp.add_argument("--runtime", default=None, help=f"runner: {runtimes} (default onnxruntime)")
        sp.add_argument("--precision", default=None, help="artifact precision: fp32, fp16, int8 (default: the first listed)")
        sp.add_argument("--format", dest="fmt", default=None, help="artifact format, e.g. onnx or ort (default: the runtime's first)")
        sp.add_argument("--threads", type=_positive_int, default=None, help="intra-op threads (default: the runtime's)")
        sp.add_argument("--provider", action="append", default=None,
                        help="onnxruntime execution provider, repeatable, e.g. CUDAExecutionProvider (default CPU)")

    r = sub.add_parser("run", help="embed a .npy batch or images, write embeddings .npy",
                       description="Embed a preprocessed float32 .npy [N,C,H,W], an image, a directory of images "
                                   "(recursive, sorted) or a text file listing image paths. For images the ordered "
                                   "paths are written beside --out as a .txt, one per line (UTF-8); a name that is not "
                                   "UTF-8 or holds a newline, another control character, leading or trailing blanks, "
                                   "or starts with \" or #, is written in double quotes with \\\\ \\\" \\n \\t \\r "
                                   "and \\xNN (byte) escapes. --out is a new path, or an earlier run's output "
                                   "with --overwrite.")
    common(r)
    r.add_argument("--input", required=True, metavar="X", help=".npy batch, image, directory of images or list file")
    r.add_argument("--out", required=True, metavar="EMB.npy", help="embeddings, float32 [N, dim]")
    r.add_argument("--batch-size", type=_positive_int, default=256, help="images per forward pass (default 256)")
    r.add_argument("--overwrite", action="store_true",
                   help="replace an earlier run's embeddings (and image list) at --out; nothing else is replaced")

    b = sub.add_parser("bench", help="latency of the artifact, as hetero-latency/1 JSON",
                       description="Time the artifact on seeded random inputs per batch size (warm-up, then "
                                   "--iters passes or --budget seconds) and write the latency JSON.")
    common(b)
    b.add_argument("--profile", default=None, help="device profile (hetero devices lists them): format, precision, runtime, settings")
    b.add_argument("--batch", type=_batch_list, default=[1, 8, 32], help="batch sizes, comma-separated (default 1,8,32)")
    g = b.add_mutually_exclusive_group()
    g.add_argument("--iters", type=_positive_int, default=None, help="timed passes per batch size (default 100)")
    g.add_argument("--budget", type=_positive_float, default=None, metavar="S", help="seconds per batch size instead of --iters")
    b.add_argument("--warmup", type=int, default=10, help="untimed passes first (default 10)")
    b.add_argument("--json", default=None, metavar="OUT", help="write the latency JSON here (- for stdout): a new "
                                                               "path, or an earlier latency JSON with --overwrite")
    b.add_argument("--overwrite", action="store_true", help="replace an earlier latency JSON at --json")
    return p


def _cmd_run(args) -> int:
    out = Path(args.out).expanduser()
    listing = out.with_suffix(".txt")
    if listing == out:
        raise DeviceError(f"--out {args.out}: use a .npy name; the image list goes beside it as .txt")
    spec = Path(args.input).expanduser()
    images = spec.is_dir() or spec.suffix.lower() != ".npy"  # what resolve_input makes of it
    why = run_refusal(out, listing if images else None, args.overwrite)
    if why:
        raise DeviceError(why)
    # an earlier run's list of the embeddings replaced now describes nothing once they are: it goes too
    stale = not images and listing_is_ours(listing, out)
    emb, paths = embed_export(args.export_dir, args.input, runtime=args.runtime or "onnxruntime",
                              precision=args.precision, fmt=args.fmt, batch_size=args.batch_size,
                              **_settings(args.threads, args.provider))
    files: dict[Path, bytes | np.ndarray] = {out: emb}
    if paths is not None:
        files[listing] = image_list(paths)
    write_outputs(files)
    if stale:
        listing.unlink(missing_ok=True)
    print(f"wrote {out} ({emb.shape[0]} x {emb.shape[1] if emb.ndim == 2 else '?'} float32)"
          + (f" and {listing} (the image paths in row order)" if paths is not None else ""),
          file=sys.stderr)
    return 0


def _cmd_bench(args) -> int:
    if args.warmup < 0:
        raise DeviceError(f"--warmup must be >= 0, got {args.warmup}")
    dest = Path(args.json).expanduser() if args.json and args.json != "-" else None
    if dest is not None:
        why = refusal(dest, "latency JSON", args.overwrite)
        if why:
            raise DeviceError(why)
    result = bench_export(args.export_dir, runtime=args.runtime, precision=args.precision, fmt=args.fmt,
                          profile=args.profile, batch_sizes=args.batch, iters=args.iters, budget_s=args.budget,
                          warmup=args.warmup, progress=sys.stderr.isatty(), **_settings(args.threads, args.provider))
    text = json.dumps(result, indent=1) + "\n"
    if args.json == "-":
        sys.stdout.write(text)
        return 0
    if dest is not None:
        write_outputs({dest: text.encode("utf-8")})
    sys.stdout.write(summary(result))
    return 0


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    """The CLI; returns the exit status (2 with one ``error:`` line on stderr for any user error)."""
    try:
        args = build_parser(prog).parse_args(argv)
        return _cmd_run(args) if args.cmd == "run" else _cmd_bench(args)
    except (DeviceError, _UsageError) as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


# ------------------------------------------------------------------------------------------------ pack

def packed_files() -> list[Path]:
    """The core's modules that go into the packed runner: ``devices/*.py`` except host-side ones."""
    here = Path(__file__).resolve().parent
    return sorted(p for p in here.glob("*.py") if p.name not in NOT_PACKED)


def pack_runner(out_zip: str | Path) -> Path:
    """Write the standalone runner as one zip (the ``devices`` core and a top-level ``__main__.py``),
    runnable with ``python runner.zip run|bench ...`` where numpy and a runtime are installed.
    Reproducible: fixed timestamps, sorted entries; its comment ``hetero-runner/1`` marks it as
    hetero's (:mod:`devices.outputs`). Written atomically and durably; returns the path."""
    out = Path(out_zip).expanduser()
    if not out.parent.is_dir():
        raise DeviceError(f"cannot write {out}: the directory {out.parent} does not exist")

    def add(z: zipfile.ZipFile, name: str, data: bytes) -> None:
        info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_DEFLATED
        info.external_attr = 0o644 << 16
        z.writestr(info, data)

    def write(f) -> None:
        with zipfile.ZipFile(f, "w") as z:
            add(z, "__main__.py", PACKED_MAIN.encode("utf-8"))
            for p in packed_files():
                add(z, f"devices/{p.name}", p.read_bytes())
            z.comment = RUNNER_ZIP_COMMENT  # what tells `hetero pack-runner --overwrite` the zip is its own

    try:
        write_all({out: write})
    except OSError as e:
        raise DeviceError(f"cannot write {out}: {e.strerror or e}") from None
    return out
