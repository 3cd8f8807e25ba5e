"""`hetero demo`: the whole slice on Fashion-MNIST; exits with its closing verify's verdict."""
from __future__ import annotations

import argparse

from hetero.app.demo import DemoConfig, run_demo
from hetero.errors import HeteroError


def cmd_demo(args: argparse.Namespace) -> int:
    cloud_opts = [f"--{k.replace('_', '-')}" for k in ("cloud_model", "cloud_epochs", "cloud_margin") if getattr(args, k) is not None]
    if cloud_opts and not args.train_cloud:
        raise HeteroError(f"{', '.join(cloud_opts)} set(s) how the cloud is trained, but the demo loads the shipped "
                          "pretrained cloud; add --train-cloud")
    kw = {k: getattr(args, k) for k in ("out", "data", "cloud_model", "cloud_epochs", "cloud_margin", "edge_model", "edge_epochs",
                                          "control_epochs", "train_limit", "gallery_limit", "query_limit", "seed", "gates")
          if getattr(args, k) is not None}
    report = run_demo(DemoConfig(progress=not args.quiet, train_cloud=args.train_cloud, **kw))
    return int(report["verify"]["verdict"]["exit_code"])


def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the whole slice on Fashion-MNIST (quick configuration)")
    p.add_argument("--out", help="output directory (default runs/demo; replaced atomically)")
    p.add_argument("--data", help="Fashion-MNIST folder (default: searched, see docs/training.md#data)")
    p.add_argument("--train-cloud", action="store_true",
                   help="train the cloud model here (default: load the shipped pretrained ResNet-20 cloud)")
    p.add_argument("--cloud-model", help="with --train-cloud: backbone (default resnet20)")
    p.add_argument("--cloud-epochs", type=int, help="with --train-cloud: epochs (default 2)")
    p.add_argument("--cloud-margin", type=float, help="with --train-cloud: CosFace margin (default 0.2)")
    p.add_argument("--edge-model", help="edge and control backbone (default mobilenet_w050)")
    p.add_argument("--edge-epochs", type=int, help="epochs of the compatible edge (default 2)")
    p.add_argument("--control-epochs", type=int, help="epochs of the control (default 1)")
    p.add_argument("--train-limit", type=int, help="train on the first N train images (the gallery stays whole)")
    p.add_argument("--gallery-limit", type=int, help="use the first N train images as the gallery")
    p.add_argument("--query-limit", type=int, help="use the first N test images as queries")
    p.add_argument("--seed", type=int)
    p.add_argument("--gates", help="gates TOML for the closing `hetero verify` (default: the project's targets); "
                                   "the demo's exit code is verify's")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)
