"""Helpers shared by the test files that drive the CLI: in-process runs through ``main(argv)`` and the
one-line error every bad input must give."""
from __future__ import annotations

from typing import Any

from hetero.app.cli import main

# gates that a tiny model passes whatever its training landed on (the gates themselves are tested on
# their own): the verdict is PASS by construction, and a test checks what the report says, not a threshold
PERMISSIVE_GATES = """
[all]
compatibility_criterion = false
max_gap_to_paragon = 1.0
max_negative_flip_rate = 1.0
[precision.fp16]
min_drift_cosine = 0.99
min_top10_overlap = 0.9
"""


def other_space_cloud(src, dest) -> None:
    """Save at ``dest`` a copy of the cloud checkpoint ``src`` with its weights nudged: a cloud of
    another embedding space (its space fingerprint is its own)."""
    import torch

    from hetero.checkpoint import load_checkpoint, save_checkpoint

    other = load_checkpoint(src)
    with torch.no_grad():
        next(other.model.parameters()).mul_(1.01)
    other.space = other.fingerprint
    save_checkpoint(other, dest)


def run(capsys, *argv: Any) -> tuple[int, str, str]:
    """``hetero ARGV`` in this process: (exit status, stdout, stderr). argparse's own usage errors
    (SystemExit) are returned as their status too."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 2
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(code: int, err: str, *words: str, status: int = 2) -> str:
    """Exactly one ``error:`` line on stderr naming ``words``, no traceback, exit ``status``."""
    assert code == status, (code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]
