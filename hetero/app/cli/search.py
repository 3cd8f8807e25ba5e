"""`hetero search`: parse, call :func:`hetero.app.search.search`."""
from __future__ import annotations

import argparse

from hetero.app.options import parse_kv
from hetero.app.search import SearchConfig, search


def cmd_search(args: argparse.Namespace) -> int:
    kw = {k: getattr(args, k) for k in ("population", "generations", "mutate_prob", "val_limit", "seed", "lut",
                                        "finetune_top", "finetune_epochs") if getattr(args, k) is not None}
    if args.finetune_losses:
        kw["finetune_losses"] = parse_kv(args.finetune_losses, "--finetune-losses")
    search(args.supernet, args.cloud, args.budget, data=args.data, out=args.out, cfg=SearchConfig(**kw),
           progress=not args.quiet)
    return 0


def add_search(sub) -> None:
    p = sub.add_parser("search", help="evolutionary search of the supernet for the best compatible subnet per budget")
    p.add_argument("--supernet", required=True, help="directory written by `hetero train-supernet`")
    p.add_argument("--cloud", required=True, help="the cloud it was trained against")
    p.add_argument("--budget", action="append", required=True,
                   help="flops=0.8M | params=50k | latency=0.5ms@host-cpu-1thread (repeat for a Pareto front)")
    p.add_argument("--out", required=True, help="directory for pareto.json, pareto.png and arch.json")
    p.add_argument("--data", help="the dataset the supernet was trained on (default Fashion-MNIST)")
    p.add_argument("--population", type=int)
    p.add_argument("--generations", type=int)
    p.add_argument("--mutate-prob", type=float)
    p.add_argument("--val-limit", type=int, help="score on the first N validation images (default all)")
    p.add_argument("--lut", help="latency budgets: predict from this latency look-up table (JSON; created if missing, "
                                 "missing blocks measured into it); without it each candidate is timed whole")
    p.add_argument("--finetune-top", type=int, help="per budget, fine-tune the best N candidates by the supernet proxy "
                                                    "and choose among them by the fine-tuned reward (default 0: off)")
    p.add_argument("--finetune-epochs", type=int, help="epochs of that fine-tuning (default 1)")
    p.add_argument("--finetune-losses", help="its loss recipe, e.g. influence=1 (default: the supernet's losses)")
    p.add_argument("--seed", type=int)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_search)
