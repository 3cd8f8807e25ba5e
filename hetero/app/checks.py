"""The two retrieval checks as the Python API gives them: ``evaluate`` (torch models, and optionally
an export through onnxruntime, against the cloud gallery) and ``verify`` (every artifact of an export
on every runner here, with gates and a verdict), each returning its report with the paths written."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devices.schema import MANIFEST_FILE
from hetero.app.evaluate import evaluate as _evaluate
from hetero.app.verify.run import verify as _verify


@dataclass(frozen=True)
class EvaluateResult:
    """The evaluate report (retrieval rows: mAP@R and R@k per query->gallery pair, flips, the
    compatibility criterion) and where it was written, if anywhere."""
    report: dict[str, Any] = field(repr=False)
    path: Path | None = None

    @property
    def retrieval(self) -> list[dict[str, Any]]:
        return list(self.report["retrieval"])

    @property
    def compatible(self) -> bool:
        """Whether every compatible edge met the criterion (edge->cloud beats edge->edge)."""
        return all(c["criterion_met"] for c in self.report["compatibility"])


@dataclass(frozen=True)
class VerifyResult:
    """The verify report (every artifact x runner pair scored, the gates and the verdict) and its
    directory (report.json, report.md and, unless ``html=False``, report.html)."""
    report: dict[str, Any] = field(repr=False)
    path: Path

    @property
    def exit_code(self) -> int:
        """0: every gate passed; 1: a gate or a runner failed (as `hetero verify` exits)."""
        return int(self.report["verdict"]["exit_code"])

    @property
    def passed(self) -> bool:
        return self.exit_code == 0


def evaluate(cloud: str | Path, edge: str | Path, *, artifact: str | Path | None = None, data: str | None = None,
             query_limit: int | None = None, gallery_limit: int | None = None, out: str | Path | None = None,
             update: bool = False, progress: bool = True, log: Callable[[str], None] = print) -> EvaluateResult:
    """Cross-model retrieval: the test split's queries against the cloud-embedded train split, for the
    paragon (cloud->cloud), edge->edge and edge->cloud, and through onnxruntime for ``artifact`` (an
    export directory). ``update=True`` names the rows old/new (``cloud`` the old cloud, ``edge`` the
    new cloud trained compatible with it). ``out``: write report.json and report.md there."""
    report = _evaluate(str(cloud), str(edge), artifact=str(artifact) if artifact else None, data=data,
                       query_limit=query_limit, gallery_limit=gallery_limit, out=str(out) if out else None,
                       progress=progress, update=update, log=log)
    return EvaluateResult(report, Path(out) if out else None)


def verify(export: str | Path, cloud: str | Path, *, edge: str | Path | None = None, data: str | None = None,
           gates: str | Path | None = None, out: str | Path | None = None, index: str = "exact",
           runtimes: Sequence[str] | None = None, require: Sequence[str] | None = None,
           query_limit: int | None = None, gallery_limit: int | None = None, latency: bool = True,
           html: bool = True, progress: bool = True, log: Callable[[str], None] = print) -> VerifyResult:
    """Embed the queries with every artifact of the export on every runner here (or ``runtimes``),
    search the cloud gallery, score each pair against the torch edge and the paragon, and apply
    ``gates`` (a TOML file; default the project's targets). ``require``: ``FORMAT@RUNNER`` pairs that
    must run here. ``out`` defaults to ``verify/`` next to the export directory."""
    report = _verify(str(export), str(cloud), edge=str(edge) if edge else None, data=data,
                     gates=str(gates) if gates else None, out=str(out) if out else None, index=index,
                     runners=list(runtimes) if runtimes else None, query_limit=query_limit,
                     gallery_limit=gallery_limit, latency=latency, html=html, progress=progress,
                     require=list(require) if require else None, log=log)
    d = Path(export)
    d = d.parent if d.name == MANIFEST_FILE and d.is_file() else d  # as verify resolves it (no second read)
    return VerifyResult(report, Path(out) if out else d.parent / "verify")
