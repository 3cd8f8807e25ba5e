"""`hetero data`, `models` and `cache`: what data, backbones and cached embeddings there are."""
from __future__ import annotations

import argparse
import time

import numpy as np

from hetero.data import load_dataset
from hetero.data._image_cache import clear_image_cache, images_dir
from hetero.embed import cache_entries, clear_cache, targets_dir
from hetero.errors import MissingDependencyError
from hetero.models import ModelSpec, create_embedding_model, list_backbones
from hetero.models.complexity import count_flops, count_params
from hetero.models.library import TIMM, TORCHVISION, timm_names, torchvision_names
from hetero.models.library_flops import count_native, curated, read_table


def cmd_data(args: argparse.Namespace) -> int:
    for split in ("train", "test"):
        ds = load_dataset(args.data, split)
        counts = {int(c): int(n) for c, n in zip(*np.unique(ds.labels, return_counts=True))}
        print(f"{ds.name}: {len(ds)} images {ds.images.shape[1:]}, {len(ds.classes)} classes, per class {counts}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    for name in list_backbones():
        m = create_embedding_model(ModelSpec(name, 128), 1)
        print(f"{name:<28} params {count_params(m):>11,}  MFLOPs@1x28x28 {count_flops(m, (1, 28, 28)) / 1e6:9.2f}")
    if args.recount:
        rows, where = {n: count_native(n) for n in curated()}, "counted now"
    else:
        table = read_table()
        rows, where = table["models"], "counted with " + ", ".join(f"{k} {v}" for k, v in table["versions"].items())
    for name, r in rows.items():
        at = f"MFLOPs@{r['channels']}x{r['size']}x{r['size']}"
        print(f"{name:<28} params {r['params']:>11,}  {at:<17}{r['mflops']:>9.2f}")
    print(f"library rows at their native size with hetero's head (dim 128), {where}. Any other name works too: "
          "tv:NAME for any torchvision classification model (pip install 'hetero[byo]'), timm:NAME for any timm model "
          "(pip install 'hetero[timm]'); `hetero models --all` lists them")
    if args.all:
        for prefix, names in ((TORCHVISION, torchvision_names), (TIMM, timm_names)):
            try:
                print(" ".join(prefix + n for n in names()))
            except MissingDependencyError as e:
                print(f"{prefix}NAME: {e}")
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    where = targets_dir()
    if args.clear:
        gone = clear_cache(args.space)
        print(f"deleted {len(gone)} cached embedding file(s), {sum(r['bytes'] for r in gone) / 1e6:.1f} MB, from {where}")
        images = images_dir()
        if args.space is None and images.is_dir():  # decoded ImageFolder pixels and file hashes (HETERO_IMAGE_CACHE)
            gone = clear_image_cache(images)
            print(f"deleted {len(gone)} decoded-image cache file(s), {sum(gone.values()) / 1e6:.1f} MB, from {images}")
        return 0
    rows = cache_entries(args.space)
    for r in rows:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["mtime"]))
        print(f"model {r['space']}  data {r['data']}  {r['images']:>7} images  {r['bytes'] / 1e6:7.1f} MB  {when}")
    print(f"{len(rows)} file(s), {sum(r['bytes'] for r in rows) / 1e6:.1f} MB in {where} ($HETERO_CACHE moves it); "
          "`hetero cache --clear` deletes them")
    return 0


def add_data(sub) -> None:
    p = sub.add_parser("data", help="find (or download) the dataset and describe it")
    p.add_argument("--data")
    p.set_defaults(func=cmd_data)


def add_cache(sub) -> None:
    p = sub.add_parser("cache", help="list (or --clear) the cached embeddings: cloud targets (train-edge) and "
                                        "verify's torch embeddings")
    p.add_argument("--clear", action="store_true", help="delete them (they are recomputed when next needed)")
    p.add_argument("--fingerprint", "--space", dest="space", help="only the files of models (a cloud: its space) whose fingerprint starts with this")
    p.set_defaults(func=cmd_cache)


def add_models(sub) -> None:
    p = sub.add_parser("models", help="list registered backbones with params and FLOPs")
    p.add_argument("--all", action="store_true", help="also every tv:/timm: name the installed libraries have")
    p.add_argument("--recount", action="store_true", help="count the library rows now (seconds each) instead of "
                                                          "reading them from the table shipped with hetero")
    p.set_defaults(func=cmd_models)
