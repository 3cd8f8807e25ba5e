"""Plumbing shared by the benchmark scripts: print the markdown, write the JSON and markdown files."""
from __future__ import annotations

import json
from pathlib import Path


def emit(result: dict, md: str, json_path: str | None, md_path: str | None) -> None:
    print(md)
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    if md_path:
        Path(md_path).write_text(md)
