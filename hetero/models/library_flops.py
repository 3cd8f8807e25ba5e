"""Params and MFLOPs of the curated library backbones (``hetero models``) at their native input size, with
hetero's embedding head (dim 128), RGB. Counting a ViT-B or a ResNet-50 at 224 px takes seconds each on a
small CPU, so ``library_flops.json`` holds them, written by ``python -m hetero.models.library_flops``
(rerun it after a torchvision or timm upgrade; a test recounts a cheap one against the file).
"""
from __future__ import annotations

import json
import sys
from importlib import resources
from pathlib import Path
from typing import Any

from hetero.models.complexity import count_flops, count_params
from hetero.models.embedding import ModelSpec, create_embedding_model
from hetero.models.library import CURATED, library_defaults

TABLE = "library_flops.json"
DIM = 128


def curated() -> list[str]:
    return [prefix + n for prefix, names in CURATED.items() for n in names]


def count_native(name: str, channels: int = 3) -> dict[str, Any]:
    """Params and MFLOPs of ``name`` with hetero's head at its native size (builds the model and runs it once)."""
    size = library_defaults(name)["size"]
    m = create_embedding_model(ModelSpec(name, DIM), channels)
    return {"size": size, "channels": channels, "params": count_params(m),
            "mflops": round(count_flops(m, (channels, size, size)) / 1e6, 2)}


def read_table() -> dict[str, dict[str, Any]]:
    """The precomputed rows (name -> size, channels, params, mflops), with the library versions counted."""
    text = resources.files("hetero.models").joinpath(TABLE).read_text(encoding="utf-8")
    return json.loads(text)


def write_table(path: Path | None = None) -> dict[str, Any]:
    import timm  # optional extra, needed to count the timm rows
    import torchvision  # optional extra, needed to count the tv rows

    rows = {name: count_native(name) for name in curated()}
    table = {"versions": {"torchvision": torchvision.__version__, "timm": timm.__version__}, "dim": DIM, "models": rows}
    path = path or Path(__file__).with_name(TABLE)
    lines = [f" {json.dumps(k)}: {json.dumps(v)}" for k, v in rows.items()]  # a row per model: readable diffs
    head = json.dumps({k: v for k, v in table.items() if k != "models"})[:-1]
    path.write_text(head + ', "models": {\n' + ",\n".join(lines) + "\n}}\n", encoding="utf-8")
    return table


if __name__ == "__main__":
    t = write_table(Path(sys.argv[1]) if len(sys.argv) > 1 else None)
    print(f"{len(t['models'])} models counted ({t['versions']})")
