"""Export fidelity, export time and weight bytes per format at real resolution (issue 23, point 4).

``measure(backbone, size)`` builds an untrained ``backbone`` (``tv:NAME``, ``timm:NAME``, a registered
name, or ``nas_mbv3`` with its kwargs) for ``size`` px RGB input with ImageNet normalisation, sets its
batch-norm statistics from 32 other synthetic images (random weights, but folded batch norm is not
the identity), exports it to ``formats`` (default: every format of issue 23) with ``hetero export``'s
driver (``export_checkpoint``), and
returns one row per format: the fidelity the export measured (min/mean cosine vs torch, the label:
``measured`` by onnxruntime, ``emulated`` by hetero's Core ML interpreter, ``pending`` for a TensorRT
plan built on the target), export seconds, artifact and weight bytes. ``benchmarks/real_resolution.py``
calls it; run alone it prints a JSON table::

    .venv/bin/python benchmarks/export_real_resolution.py tv:mobilenet_v3_small --size 224 --json out.json

The check and calibration inputs are synthetic (smooth random images, preprocessed), not a dataset:
the numbers say how faithful the conversion is, not how accurate the model is. Untrained MobileNetV3s
and EfficientNets amplify quantisation noise through their depth, so their INT8 fidelity is far
below a trained model's. ``train_steps`` runs a few SGD steps first (see :func:`train_a_little`).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from devices.bench import cpu_model
from export import export_checkpoint
from hetero.checkpoint import Checkpoint
from hetero.data import Preprocess
from hetero.models import ModelSpec, create_embedding_model

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FORMATS = ("onnx", "onnx-fp16", "onnx-int8", "ort", "coreml", "coreml-fp16", "tensorrt")


def imagenet_preprocess(size: int) -> Preprocess:
    return Preprocess(size, 3, IMAGENET_MEAN, IMAGENET_STD)


def synthetic_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """uint8 [n, size, size, 3] images with image-like structure (smooth colour blobs plus noise),
    so that activations and INT8 calibration ranges look more like photos' than white noise does."""
    rng = np.random.default_rng(seed)
    small = rng.uniform(0, 255, (n, 8, 8, 3)).astype(np.float32)
    t = torch.from_numpy(small).permute(0, 3, 1, 2)
    big = torch.nn.functional.interpolate(t, size=(size, size), mode="bicubic", align_corners=False)
    big = big.permute(0, 2, 3, 1).numpy() + rng.normal(0, 12, (n, size, size, 3))
    return np.clip(np.rint(big), 0, 255).astype(np.uint8)


def checkpoint(backbone: str, size: int, *, dim: int = 128, kwargs: dict[str, Any] | None = None,
               seed: int = 0, bn_images: np.ndarray | None = None) -> Checkpoint:
    """An untrained ``backbone`` for ``size`` px RGB, its batch-norm running statistics set from
    ``bn_images`` (preprocessed) in one train-mode pass with momentum None."""
    torch.manual_seed(seed)
    spec = ModelSpec(backbone, dim, kwargs or {})
    prep = imagenet_preprocess(size)
    model = create_embedding_model(spec, 3)
    if bn_images is not None:
        set_batch_norm(model, bn_images)
    return Checkpoint(role="edge", spec=spec, model=model.eval(), classifier=None, preprocess=prep,
                      classes=tuple(str(i) for i in range(10)), space="0" * 64)


def train_a_little(ck: Checkpoint, steps: int, size: int = 64, batch: int = 32, seed: int = 0) -> None:
    """``steps`` SGD steps (cross-entropy through a linear head on the embedding) on synthetic images
    labelled by their dominant colour and brightness, at ``size`` px (cheap; the convolutional
    weights do not depend on the resolution). Random-weight MobileNetV3s are chaotic: INT8 noise
    grows through their depth (tv:mobilenet_v3_small at 128 px: min cosine 0.94-0.97 untrained,
    0.9997 after 60 such steps), which a trained model's is not; these steps stand in for training."""
    torch.manual_seed(seed)
    prep = Preprocess(size, 3, IMAGENET_MEAN, IMAGENET_STD)
    imgs = synthetic_images(256, size, seed=7)
    labels = torch.from_numpy(imgs.reshape(len(imgs), -1, 3).mean(1).argmax(1) * 2 + (imgs.mean((1, 2, 3)) > 127))
    x = torch.from_numpy(prep.apply(imgs))
    head = torch.nn.Linear(ck.spec.dim, 6)
    opt = torch.optim.SGD([*ck.model.parameters(), *head.parameters()], lr=0.05, momentum=0.9)
    ck.model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,))
        loss = torch.nn.functional.cross_entropy(head(ck.model(x[idx])) * 10, labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    ck.model.eval()


def set_batch_norm(model: torch.nn.Module, images: np.ndarray) -> None:
    """Batch-norm running statistics from ``images`` (preprocessed): one train-mode pass, momentum None."""
    keep = {}
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            keep[m] = m.momentum
            m.momentum = None
            m.reset_running_stats()
    model.train()
    with torch.no_grad():
        model(torch.from_numpy(images))
    for m, mom in keep.items():
        m.momentum = mom
    model.eval()


def measure(backbone: str, size: int = 224, *, kwargs: dict[str, Any] | None = None,
            formats: tuple[str, ...] | list[str] = FORMATS, n_check: int = 32, n_calib: int = 256,
            batch_sizes: tuple[int, ...] = (1, 8), image_input: bool = False, out: str | Path | None = None,
            dim: int = 128, train_steps: int = 0) -> dict[str, Any]:
    """Export ``backbone`` at ``size`` px to ``formats`` and return the per-format rows (see the module
    docstring). ``image_input``: also a Core ML package with the image input (``coreml.image_input``).
    ``train_steps``: that many steps of :func:`train_a_little` first (0: random weights); the
    batch-norm statistics are then set at ``size`` px either way."""
    prep = imagenet_preprocess(size)
    bn = prep.apply(synthetic_images(32, size, seed=1))
    ck = checkpoint(backbone, size, kwargs=kwargs, dim=dim)
    if train_steps:
        train_a_little(ck, train_steps)
    set_batch_norm(ck.model, bn)
    check = prep.apply(synthetic_images(n_check, size, seed=2))
    calib = prep.apply(synthetic_images(n_calib, size, seed=3))
    params = sum(p.numel() for p in ck.model.parameters())
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="hetero-rr-") as tmp:
        runs = [({"batch_sizes": batch_sizes}, list(formats), "x")]
        if image_input:
            runs.append(({"coreml.image_input": True}, ["coreml"], "img"))
        for options, fmts, sub in runs:
            dest = Path(out) / sub if out else Path(tmp) / sub
            t0 = time.perf_counter()
            m = export_checkpoint(ck, dest, formats=fmts, name="edge", check_inputs=check,
                                  check_desc=f"{n_check} synthetic {size}px images", calib_inputs=calib,
                                  options=options, overwrite=True)
            total = time.perf_counter() - t0
            for a in m["artifacts"]:
                fid = a.get("fidelity") or {}
                rows.append({
                    "format": a["export_format"] + ("+image" if sub == "img" else ""), "precision": a.get("precision"),
                    "status": a.get("status"), "seconds": a.get("seconds"), "bytes": a.get("bytes"),
                    "weight_bytes": a.get("weight_bytes"), "label": fid.get("label"),
                    "min_cosine": fid.get("min_cosine"), "mean_cosine": fid.get("mean_cosine"),
                    "max_abs_diff": fid.get("max_abs_diff"), "image": a.get("image"),
                    "input_normalisation": a.get("input_normalisation"),
                })
            rows.append({"format": f"total ({sub})", "seconds": round(total, 2)})
    return {"backbone": backbone, "kwargs": kwargs or {}, "size": size, "params": params, "dim": dim,
            "check_inputs": n_check, "calib_inputs": n_calib, "train_steps": train_steps, "cpu": cpu_model(), "threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"), "rows": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("backbone")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--kwargs", default="{}", help="backbone kwargs as JSON (e.g. a nas_mbv3 arch and space)")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--check", type=int, default=32)
    ap.add_argument("--calib", type=int, default=256, help="INT8 calibration images (default 256: MobileNetV3-Large after 40 training steps "
                    "gave min cosine 0.984 with 64 and 0.9957 with 256)")
    ap.add_argument("--image-input", action="store_true")
    ap.add_argument("--train-steps", type=int, default=0, help="SGD steps on synthetic images first (0: random weights)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    res = measure(args.backbone, args.size, kwargs=json.loads(args.kwargs), formats=args.formats.split(","),
                  n_check=args.check, n_calib=args.calib, image_input=args.image_input,
                  train_steps=args.train_steps)
    text = json.dumps(res, indent=1)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
