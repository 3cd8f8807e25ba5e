"""`hetero train-cloud`, `train-edge`, `train-supernet`, `import-cloud` and `fit-classifier`: parse,
call :mod:`hetero.app.training`, print."""
from __future__ import annotations

import argparse
import json
from typing import Any

from hetero import distributed
from hetero.app import training
from hetero.app.options import floats, load_config_file, nest, parse_kv
from hetero.errors import HeteroError
from hetero.nas.space import read_space_arg
from hetero.nas.train import SupernetConfig
from hetero.train import TrainConfig


def train_options(args: argparse.Namespace) -> dict[str, Any]:
    """The training options of ``--config`` with the flags given on top (None: not given)."""
    values = load_config_file(args.config)
    known = set(TrainConfig.__dataclass_fields__)
    unknown = set(values) - known
    if unknown:
        raise HeteroError(f"--config: unknown option(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
    flags = {"model": args.model, "dim": args.dim, "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
             "weight_decay": args.weight_decay, "seed": args.seed, "limit": args.limit, "margin": args.margin,
             "model_kwargs": parse_kv(args.model_kwargs, "--model-kwargs"), "augment": args.augment or None,
             "size": args.size, "pretrained": args.pretrained}
    if hasattr(args, "loss"):
        flags["losses"] = parse_kv(args.loss, "--loss")
        flags["loss_options"] = nest(parse_kv(args.loss_options, "--loss-options"))
        flags["targets"] = args.targets
    values.update({k: v for k, v in flags.items() if v is not None})
    return values


def _run_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"overwrite": args.overwrite, "progress": not args.quiet, "save_every": args.save_every,
            "state_dir": args.state_dir, "resume": args.resume}


def cmd_train_cloud(args: argparse.Namespace) -> int:
    r = training.train_cloud(args.out, data=args.data, config=train_options(args), **_run_options(args))
    if distributed.is_main():
        print(f"cloud checkpoint: {r.path} (space {r.space[:12]}, last epoch loss {r.history[-1]['total']:.4f})")
    return 0


def cmd_train_edge(args: argparse.Namespace) -> int:
    r = training.train_edge(args.cloud, args.out, data=args.data, config=train_options(args), compat=not args.no_compat,
                            arch=args.arch, init_from=args.init_from, **_run_options(args))
    if distributed.is_main():
        kind = "control (no compatibility loss)" if r.checkpoint.role == "control" else f"edge in cloud space {r.space[:12]}"
        print(f"{kind} checkpoint: {r.path}, last epoch {json.dumps({k: round(v, 4) for k, v in r.history[-1].items()})}")
    return 0


def cmd_train_supernet(args: argparse.Namespace) -> int:
    kw = {k: getattr(args, k) for k in ("epochs", "batch_size", "lr", "n_random", "distill", "val_size", "limit", "seed")
          if getattr(args, k) is not None}
    if args.loss:
        kw["losses"] = parse_kv(args.loss, "--loss")
    if args.space:
        kw["space"] = read_space_arg(args.space)  # a preset's name (mbv3-224) or a JSON file of fields
    cfg = SupernetConfig(progressive=args.progressive, sort_channels=args.sort_channels, **kw)
    r = training.train_supernet(args.cloud, args.out, data=args.data, config=cfg, resume=args.resume,
                                save_every=args.save_every, progress=not args.quiet)
    if distributed.is_main():
        print(f"supernet: {r.path} ({r.meta['epochs_done']} epochs, validation split {r.meta['split']['val']} images)")
    return 0


def cmd_import_cloud(args: argparse.Namespace) -> int:
    if bool(args.torchvision) == bool(args.factory):
        raise HeteroError("give exactly one of --torchvision NAME or --factory module:callable")
    r = training.import_cloud(args.out, args.weights, dim=args.dim, size=args.size, channels=args.channels,
                              mean=floats(args.mean, "--mean", args.channels), std=floats(args.std, "--std", args.channels),
                              torchvision=args.torchvision, factory=args.factory,
                              model_kwargs=parse_kv(args.model_kwargs, "--model-kwargs"), overwrite=args.overwrite)
    kind, name = ("torchvision", args.torchvision) if args.torchvision else ("factory", args.factory)
    print(f"cloud checkpoint: {r.path} ({kind} {name}, dim {args.dim}, space {r.space[:12]}, no classifier: "
          "run `hetero fit-classifier` for the influence loss)")
    return 0


def cmd_fit_classifier(args: argparse.Namespace) -> int:
    r = training.fit_classifier(args.cloud, args.out, data=args.data, epochs=args.epochs, scale=args.scale,
                                margin=args.margin, overwrite=args.overwrite, progress=not args.quiet)
    print(f"cloud checkpoint with classifier: {r.path} ({len(r.checkpoint.classes)} classes, train accuracy "
          f"{r.checkpoint.info['classifier_train_accuracy']:.4f}, new space {r.space[:12]})")
    return 0


def add_train_args(p: argparse.ArgumentParser, default_model: str) -> None:
    p.add_argument("--out", help="checkpoint directory to write (required unless --resume)")
    p.add_argument("--data", help="dataset folder (Fashion-MNIST IDX files or an ImageFolder), or synthetic: "
                   "(the built-in test set); default: Fashion-MNIST")
    p.add_argument("--model", help=f"backbone name (default {default_model}; see `hetero models`)")
    p.add_argument("--model-kwargs", help="backbone options, e.g. width=32,depth=20")
    p.add_argument("--dim", type=int, help="embedding dim (default 128)")
    p.add_argument("--epochs", type=int, help="epochs (default 2)")
    p.add_argument("--batch-size", type=int, help="batch size (default 128)")
    p.add_argument("--lr", type=float, help="peak learning rate of the one-cycle schedule (default 0.1)")
    p.add_argument("--weight-decay", type=float, help="weight decay (default 5e-4)")
    p.add_argument("--limit", type=int, help="train on the first N images only")
    p.add_argument("--margin", type=float, help="CosFace margin of the model's own cosine classifier (default 0; "
                                                "0.2 gives tighter clusters and a higher mAP@R; train-edge: the ce loss's classifier)")
    p.add_argument("--augment", nargs="?", const=True, choices=(True, "auto", "pad-crop", "imagenet"), metavar="POLICY",
                   help="augment the training images: pad-crop (random flips and 2-px shifts), imagenet "
                        "(RandomResizedCrop, flip, colour jitter, drawn from each original file in the loader's workers); "
                        "alone: imagenet for real-resolution (tv:/timm:) preprocessing, else pad-crop")
    p.add_argument("--size", type=int, help="square input size in px (default: a tv:/timm: model's native size, "
                                            "an edge its cloud's, else the data's: 28 for Fashion-MNIST, 32 for a folder)")
    p.add_argument("--pretrained", metavar="FILE|NAME",
                   help="start a tv:/timm: backbone from ImageNet weights: a state dict file (.safetensors, or .pt read "
                        "with weights_only), or the library's weights by name (tv: DEFAULT, IMAGENET1K_V1; timm: true or a "
                        "tag) from its own cache, never downloaded")
    p.add_argument("--seed", type=int)
    p.add_argument("--config", help="TOML/JSON file of training options; flags override it")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (and a left-over --state-dir)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--save-every", type=int, metavar="N",
                   help="save the training state every N steps, and at each epoch end (default 200; 0: epoch ends only)")
    p.add_argument("--state-dir", metavar="DIR", help="where the training state lives while the run lasts (default "
                                                      "<out>.resume next to --out; deleted once the checkpoint is written)")
    p.add_argument("--resume", metavar="DIR", help="continue the interrupted run whose state is in DIR, with its own "
                                                   "options and paths (flags that contradict them are refused)")


def add_train_cloud(sub) -> None:
    p = sub.add_parser("train-cloud", help="train the cloud embedding model (cosine-classifier cross-entropy)")
    add_train_args(p, "resnet20")
    p.set_defaults(func=cmd_train_cloud)


def add_train_edge(sub) -> None:
    p = sub.add_parser("train-edge", help="train an edge model into a cloud model's embedding space")
    p.add_argument("--cloud", help="cloud checkpoint directory (required unless --resume)")
    add_train_args(p, "mobilenet_w050")
    p.add_argument("--loss", help="loss weights: influence, alignment, contrastive, relational, ce, logit_distill "
                                  "(default influence=1,alignment=1,relational=1; see docs/training.md, Which loss when)")
    p.add_argument("--loss-options", help="per-loss options, e.g. alignment.kind=l2,contrastive.temperature=0.1,"
                                          "contrastive.positives=label,relational.k=32,influence.margin=0.2")
    p.add_argument("--targets", choices=("auto", "cached", "online"),
                   help="cloud targets: cached once (memory-mapped) or computed per batch by the frozen cloud; "
                        "auto = online with --augment, else cached")
    p.add_argument("--no-compat", action="store_true", help="train the control: own classifier, no compatibility loss")
    p.add_argument("--arch", help="arch.json from `hetero search`: train that subnet (backbone nas_mbv3)")
    p.add_argument("--init-from", help="supernet directory (`hetero train-supernet`): start from the subnet's shared weights")
    p.set_defaults(func=cmd_train_edge)


def add_train_supernet(sub) -> None:
    p = sub.add_parser("train-supernet", help="train the elastic NAS supernet into a cloud space (sandwich rule)")
    p.add_argument("--cloud", required=True, help="cloud checkpoint directory")
    p.add_argument("--out", required=True, help="supernet directory to write (rewritten after every epoch)")
    p.add_argument("--data", help="dataset folder (default Fashion-MNIST); its train split, less --val-size images")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--n-random", type=int, help="random subnets per step besides the largest and smallest (default 2)")
    p.add_argument("--distill", type=float, help="in-place distillation weight from the largest subnet (default 1; 0 off)")
    p.add_argument("--progressive", action="store_true", help="progressive shrinking: kernel, then depth, then expand/width")
    p.add_argument("--sort-channels", action="store_true", help="with --progressive: re-sort channels by importance per phase")
    p.add_argument("--loss", help="compatibility losses (default influence=1,alignment=1)")
    p.add_argument("--val-size", type=int, help="validation images carved from the train split for the search (default 5000)")
    p.add_argument("--limit", type=int, help="use the first N training images")
    p.add_argument("--search-space", "--space", dest="space", help="a preset (mbv3-224: OFA's MobileNetV3 space, 128-224 px "
                                   "RGB) or a JSON file of search-space fields to change from the defaults, e.g. "
                                   '{"stem_stride": 1, "head": 128} (see docs/search.md)')
    p.add_argument("--seed", type=int)
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out (from its last saved step)")
    p.add_argument("--save-every", type=int, metavar="N", help="also save the training state every N steps, in "
                                                               "--out/steps (default 200; 0: epoch ends only)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_train_supernet)


def add_import_cloud(sub) -> None:
    p = sub.add_parser("import-cloud", help="bring your own cloud model (torchvision or module:factory + weights)")
    p.add_argument("--out", required=True, help="cloud checkpoint directory to write")
    p.add_argument("--torchvision", help="torchvision model name, e.g. resnet18 (built with weights=None)")
    p.add_argument("--factory", help="module:callable returning an nn.Module whose output is the embedding")
    p.add_argument("--model-kwargs", help="keyword arguments for the model, e.g. num_classes=128")
    p.add_argument("--weights", required=True, help=".safetensors, or a .pt state dict (loaded with weights_only=True)")
    p.add_argument("--dim", type=int, required=True, help="embedding dim the model outputs")
    p.add_argument("--size", type=int, required=True, help="square input size")
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--mean", default="0.485,0.456,0.406", help="per-channel mean of 0..1 pixels")
    p.add_argument("--std", default="0.229,0.224,0.225", help="per-channel std of 0..1 pixels")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_import_cloud)


def add_fit_classifier(sub) -> None:
    p = sub.add_parser("fit-classifier", help="fit a cosine classifier on a cloud model's frozen embeddings")
    p.add_argument("--cloud", required=True)
    p.add_argument("--out", required=True, help="new cloud checkpoint (a new space: the classifier is part of it)")
    p.add_argument("--data", help="training data (default Fashion-MNIST)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--scale", type=float, default=16.0)
    p.add_argument("--margin", type=float, default=0.0)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_fit_classifier)
