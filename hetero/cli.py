"""The `hetero` command line. User errors print one line and exit 2; no tracebacks for them."""
from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Sequence

from hetero import __version__
from hetero.errors import HeteroError, Terminated, write_failure


def _load_config_file(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        raise HeteroError(f"--config {path}: no such file; pass a TOML or JSON file of training options")
    try:
        if p.suffix == ".json":
            doc = json.loads(p.read_text(encoding="utf-8"))
        else:
            import tomllib

            doc = tomllib.loads(p.read_text(encoding="utf-8"))
    except (ValueError, TypeError, RecursionError, OSError) as e:
        raise HeteroError(f"--config {path} cannot be parsed ({str(e).splitlines()[0] if str(e) else type(e).__name__}); fix the file") from None
    if not isinstance(doc, dict):
        raise HeteroError(f"--config {path} must hold a table (JSON object) of training options, got {type(doc).__name__}")
    return doc


def _parse_kv(text: str | None, what: str) -> dict[str, Any] | None:
    """'a=1,b=2' -> {'a': 1.0, 'b': 2.0}; JSON objects are accepted too."""
    if text is None:
        return None
    text = text.strip()
    if text.startswith("{"):
        try:
            return dict(json.loads(text))
        except (ValueError, RecursionError) as e:
            raise HeteroError(f"{what}: invalid JSON ({type(e).__name__}: {str(e)[:100]})") from None
    out: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in part:
            raise HeteroError(f"{what}: expected name=value pairs separated by commas, got {part!r}")
        k, v = part.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except (ValueError, RecursionError):
            out[k.strip()] = v.strip()
    return out


def _nest(flat: dict[str, Any] | None) -> dict[str, dict[str, Any]] | None:
    """{'contrastive.temperature': 0.1} -> {'contrastive': {'temperature': 0.1}}."""
    if flat is None:
        return None
    out: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        if isinstance(value, dict):
            out.setdefault(key, {}).update(value)
            continue
        if "." not in key:
            raise HeteroError(f"--loss-options: expected loss.option=value (e.g. contrastive.temperature=0.1), got {key!r}")
        loss, opt = key.split(".", 1)
        out.setdefault(loss, {})[opt] = value
    return out


def _train_config(args: argparse.Namespace, resume: dict[str, Any] | None = None, **fixed: Any):
    """The TrainConfig from --config and flags; with ``resume`` (an interrupted run's config) that one,
    after refusing any flag that contradicts it."""
    from hetero.train import TrainConfig

    known = set(TrainConfig.__dataclass_fields__)
    values = _load_config_file(args.config)
    unknown = set(values) - known
    if unknown:
        raise HeteroError(f"--config: unknown option(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
    cli = {"model": args.model, "dim": args.dim, "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
           "weight_decay": args.weight_decay, "seed": args.seed, "limit": args.limit, "margin": args.margin,
           "model_kwargs": _parse_kv(args.model_kwargs, "--model-kwargs"), "augment": args.augment or None}
    if hasattr(args, "loss"):
        cli["losses"] = _parse_kv(args.loss, "--loss")
        cli["loss_options"] = _nest(_parse_kv(args.loss_options, "--loss-options"))
        cli["targets"] = args.targets
    values.update({k: v for k, v in cli.items() if v is not None})
    values.update(fixed)
    if resume is not None:
        from hetero._resume import plain

        differ = [k for k, v in values.items() if plain(v) != resume.get(k)]
        if differ:
            flags = ", ".join("--loss" if k == "losses" else "--" + k.replace("_", "-") for k in differ)
            k = differ[0]
            raise HeteroError(f"--resume: {flags} contradict(s) the interrupted run's options ({k} was {resume.get(k)!r}, "
                              f"now {values[k]!r}); leave them out (a resumed run keeps its own options)")
        values = dict(resume)
    try:
        return TrainConfig(**values)
    except TypeError as e:
        raise HeteroError(f"invalid training options ({e})") from None


def _add_train_args(p: argparse.ArgumentParser, default_model: str) -> None:
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
    p.add_argument("--augment", action="store_true", help="random flips and 2-px shifts")
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


def cmd_data(args: argparse.Namespace) -> int:
    from hetero.data import load_dataset

    import numpy as np

    for split in ("train", "test"):
        ds = load_dataset(args.data, split)
        counts = {int(c): int(n) for c, n in zip(*np.unique(ds.labels, return_counts=True))}
        print(f"{ds.name}: {len(ds)} images {ds.images.shape[1:]}, {len(ds.classes)} classes, per class {counts}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from hetero.cost import count_flops, count_params
    from hetero.models import ModelSpec, create_embedding_model, list_backbones

    for name in list_backbones():
        m = create_embedding_model(ModelSpec(name, 128), 1)
        print(f"{name:<16} params {count_params(m):>9,}  MFLOPs@1x28x28 {count_flops(m, (1, 28, 28)) / 1e6:8.2f}")
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    import time

    from hetero.embed import cache_dir, cache_entries, clear_cache

    where = cache_dir() / "targets"
    if args.clear:
        gone = clear_cache(args.space)
        print(f"deleted {len(gone)} cached embedding file(s), {sum(r['bytes'] for r in gone) / 1e6:.1f} MB, from {where}")
        images = cache_dir() / "images"
        if args.space is None and images.is_dir():  # decoded ImageFolder pixels and file hashes (HETERO_IMAGE_CACHE)
            from hetero.data._image_cache import clear_image_cache

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


def cmd_train_cloud(args: argparse.Namespace) -> int:
    from hetero import distributed
    from hetero._resume import absolute, cli_snapshots, continue_from, recorded
    from hetero.checkpoint import check_checkpoint_dest
    from hetero.data import FASHION_MNIST_PREPROCESS, Preprocess, data_source, load_dataset
    from hetero.train import train_cloud

    distributed.init()
    state = None
    if args.resume:
        state = continue_from(args.resume, "train-cloud")
        run = state["meta"]["run"]
        args.out, args.data = recorded("--out", args.out, run["out"]), recorded("--data", args.data, run["data"])
        args.overwrite = args.overwrite or bool(run.get("overwrite"))
        cfg = _train_config(args, resume=state["meta"]["config"])
    else:
        if not args.out:
            raise HeteroError("train-cloud needs --out DIR (the checkpoint to write), or --resume DIR to continue an "
                              "interrupted run")
        if not args.model:
            args.model = "resnet20"
        cfg = _train_config(args)
    check_checkpoint_dest(args.out, "cloud", args.overwrite)
    snaps = cli_snapshots(args, "train-cloud", state, {"command": "train-cloud", "out": absolute(args.out),
                                                       "data": data_source(args.data), "overwrite": args.overwrite},
                          main=distributed.is_main())
    distributed.barrier()
    train = load_dataset(args.data, "train", progress=not args.quiet and distributed.is_main())
    c = train.images.shape[-1]
    if train.name.startswith("fashion-mnist"):
        prep = FASHION_MNIST_PREPROCESS
    elif train.lazy:  # statistics of the training images, per channel, streamed from the files
        from hetero.data.loader import pixel_stats

        mean, std = pixel_stats(train)
        prep = Preprocess(train.images.shape[1], c, mean, tuple(max(s, 1e-3) for s in std))
    else:  # statistics of the training images, per channel
        x = train.images.reshape(-1, c).astype("float64") / 255.0
        prep = Preprocess(train.images.shape[1], c, tuple(x.mean(0).tolist()), tuple(x.std(0).clip(1e-3).tolist()))
    ckpt = _train_and_save(lambda: train_cloud(cfg, train, prep, progress=not args.quiet, snapshots=snaps), args, snaps,
                           "train-cloud")
    if distributed.is_main():
        print(f"cloud checkpoint: {args.out} (space {ckpt.space[:12]}, last epoch loss {ckpt.info['history'][-1]['total']:.4f})")
    distributed.barrier()
    return 0


def _train_and_save(train, args: argparse.Namespace, snaps, command: str):
    """Run ``train()``; rank 0 alone writes the checkpoint to ``--out`` and then drops the resume state.
    An interruption keeps the state and says how to resume."""
    from hetero import distributed
    from hetero._resume import interrupted
    from hetero.checkpoint import save_checkpoint

    try:
        ckpt = train()
        if distributed.is_main():  # under torchrun only rank 0 writes
            save_checkpoint(ckpt, args.out, overwrite=args.overwrite)
    except KeyboardInterrupt as e:
        raise interrupted(e, snaps, command) from None
    if distributed.is_main():
        snaps.remove()
    return ckpt


def cmd_train_edge(args: argparse.Namespace) -> int:
    from hetero import distributed
    from hetero._resume import absolute, cli_snapshots, continue_from, recorded
    from hetero.checkpoint import check_checkpoint_dest, load_checkpoint
    from hetero.data import data_source, load_dataset
    from hetero.train import train_edge

    distributed.init()
    init_state = None
    state = None
    if args.resume:
        state = continue_from(args.resume, "train-edge")
        run = state["meta"]["run"]
        if args.arch or args.init_from:
            raise HeteroError("--resume: the model (and the weights it started from) are in the interrupted run's state; "
                              "leave out --arch and --init-from")
        args.out, args.data = recorded("--out", args.out, run["out"]), recorded("--data", args.data, run["data"])
        args.cloud = recorded("--cloud", args.cloud, run["cloud"])
        args.overwrite = args.overwrite or bool(run.get("overwrite"))
        cloud = load_checkpoint(args.cloud, role="cloud")
        if cloud.space != run.get("cloud_space"):
            raise HeteroError(f"--resume {args.resume}: the cloud {args.cloud} is now space {cloud.space[:12]}, but the run "
                              f"was training into {str(run.get('cloud_space'))[:12]}; restore that cloud, or start again")
        cfg = _train_config(args, resume=state["meta"]["config"], **({"compat": False} if args.no_compat else {}))
    else:
        if not args.out or not args.cloud:
            raise HeteroError("train-edge needs --cloud DIR and --out DIR, or --resume DIR to continue an interrupted run")
        if args.init_from and not args.arch:
            raise HeteroError("--init-from SUPERNET needs --arch arch.json (the subnet to take from it)")
        if args.arch:
            from hetero.nas.search import read_arch

            if args.model or args.model_kwargs:
                raise HeteroError("--arch sets the model; leave out --model and --model-kwargs")
            arch, space = read_arch(args.arch)
            args.model = "nas_mbv3"
        if not args.model:
            args.model = "mobilenet_w050"
        cloud = load_checkpoint(args.cloud, role="cloud")
        if args.dim is None:
            args.dim = cloud.spec.dim
        fixed = {"compat": not args.no_compat}
        if args.arch:
            fixed["model_kwargs"] = {"arch": arch.to_dict(), "space": space.to_dict()}
            if args.init_from:
                from hetero.nas.train import load_supernet

                net, meta = load_supernet(args.init_from)
                if meta.get("cloud_space") != cloud.space:
                    raise HeteroError(f"--init-from {args.init_from} was trained into cloud space {str(meta.get('cloud_space'))[:12]}, "
                                      f"not --cloud's {cloud.space[:12]}; pass the supernet trained against this cloud")
                if net.space.to_dict() != space.to_dict():
                    raise HeteroError(f"--arch {args.arch} belongs to another search space than --init-from {args.init_from}")
                init_state = net.extract(arch).state_dict()
        cfg = _train_config(args, **fixed)
    check_checkpoint_dest(args.out, "edge" if cfg.compat else "control", args.overwrite)
    snaps = cli_snapshots(args, "train-edge", state, {"command": "train-edge", "out": absolute(args.out),
                                                      "data": data_source(args.data), "cloud": absolute(args.cloud),
                                                      "cloud_space": cloud.space, "overwrite": args.overwrite},
                          main=distributed.is_main())
    distributed.barrier()
    train = load_dataset(args.data, "train", progress=not args.quiet and distributed.is_main())
    ckpt = _train_and_save(lambda: train_edge(cfg, cloud, train, progress=not args.quiet, init_state=init_state,
                                              snapshots=snaps), args, snaps, "train-edge")
    if distributed.is_main():
        kind = "control (no compatibility loss)" if not cfg.compat else f"edge in cloud space {cloud.space[:12]}"
        print(f"{kind} checkpoint: {args.out}, last epoch "
              f"{json.dumps({k: round(v, 4) for k, v in ckpt.info['history'][-1].items()})}")
    distributed.barrier()
    return 0


def cmd_train_supernet(args: argparse.Namespace) -> int:
    from hetero import distributed
    from hetero.checkpoint import load_checkpoint
    from hetero.data import load_dataset
    from hetero.nas.train import SupernetConfig, train_supernet

    kw = {k: getattr(args, k) for k in ("epochs", "batch_size", "lr", "n_random", "distill", "val_size", "limit", "seed")
          if getattr(args, k) is not None}
    if args.loss:
        kw["losses"] = _parse_kv(args.loss, "--loss")
    if args.space:
        try:
            kw["space"] = json.loads(Path(args.space).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise HeteroError(f"--space {args.space} does not exist; pass a JSON file of search-space fields") from None
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
            raise HeteroError(f"--space {args.space} is not valid JSON ({e.__class__.__name__}); fix the file") from None
    cfg = SupernetConfig(progressive=args.progressive, sort_channels=args.sort_channels, **kw)
    if args.save_every is not None and args.save_every < 0:
        raise HeteroError(f"--save-every must be >= 0 (0: at epoch ends only), got {args.save_every}")
    distributed.init()
    cloud = load_checkpoint(args.cloud, role="cloud")
    train = load_dataset(args.data, "train", progress=not args.quiet and distributed.is_main())
    try:
        meta = train_supernet(cfg, cloud, train, args.out, resume=args.resume, progress=not args.quiet,
                              save_every=200 if args.save_every is None else args.save_every)
    except KeyboardInterrupt as e:
        if not str(e) and distributed.is_main() and Path(args.out).exists():
            raise e.__class__(f"the epochs and steps done are kept in {args.out}; continue with the same command "
                              "and --resume") from None
        raise
    if distributed.is_main():
        print(f"supernet: {args.out} ({meta['epochs_done']} epochs, validation split {meta['split']['val']} images)")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from hetero.nas.search import SearchConfig, search

    kw = {k: getattr(args, k) for k in ("population", "generations", "mutate_prob", "val_limit", "seed", "lut",
                                        "finetune_top", "finetune_epochs") if getattr(args, k) is not None}
    if args.finetune_losses:
        kw["finetune_losses"] = _parse_kv(args.finetune_losses, "--finetune-losses")
    search(args.supernet, args.cloud, args.budget, data=args.data, out=args.out, cfg=SearchConfig(**kw),
           progress=not args.quiet)
    return 0


def _floats(text: str, what: str, n: int) -> tuple[float, ...]:
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise HeteroError(f"{what} must be comma-separated numbers, got {text!r}") from None
    if len(vals) == 1:
        vals = vals * n
    if len(vals) != n:
        raise HeteroError(f"{what} needs 1 or {n} values (one per channel), got {len(vals)}")
    return vals


def cmd_import_cloud(args: argparse.Namespace) -> int:
    from hetero.byo import import_cloud
    from hetero.checkpoint import check_checkpoint_dest, save_checkpoint
    from hetero.data import Preprocess

    if bool(args.torchvision) == bool(args.factory):
        raise HeteroError("give exactly one of --torchvision NAME or --factory module:callable")
    check_checkpoint_dest(args.out, "cloud", args.overwrite)
    prep = Preprocess(args.size, args.channels, _floats(args.mean, "--mean", args.channels),
                      _floats(args.std, "--std", args.channels))
    kind, name = ("torchvision", args.torchvision) if args.torchvision else ("factory", args.factory)
    ckpt = import_cloud(kind, name, args.weights, args.dim, prep, model_kwargs=_parse_kv(args.model_kwargs, "--model-kwargs"))
    save_checkpoint(ckpt, args.out, overwrite=args.overwrite)
    print(f"cloud checkpoint: {args.out} ({kind} {name}, dim {args.dim}, space {ckpt.space[:12]}, no classifier: "
          "run `hetero fit-classifier` for the influence loss)")
    return 0


def cmd_fit_classifier(args: argparse.Namespace) -> int:
    from hetero.byo import fit_classifier
    from hetero.checkpoint import check_checkpoint_dest, load_checkpoint, save_checkpoint
    from hetero.data import load_dataset

    cloud = load_checkpoint(args.cloud, role="cloud")
    check_checkpoint_dest(args.out, "cloud", args.overwrite)
    train = load_dataset(args.data, "train", progress=not args.quiet)
    ckpt = fit_classifier(cloud, train, epochs=args.epochs, scale=args.scale, margin=args.margin, progress=not args.quiet)
    save_checkpoint(ckpt, args.out, overwrite=args.overwrite)
    print(f"cloud checkpoint with classifier: {args.out} ({len(ckpt.classes)} classes, train accuracy "
          f"{ckpt.info['classifier_train_accuracy']:.4f}, new space {ckpt.space[:12]})")
    return 0


def _int_list(text: str, what: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise HeteroError(f"{what} must be comma-separated whole numbers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise HeteroError(f"{what} must be whole numbers >= 1, got {text!r}")
    return tuple(sorted(set(vals)))


def cmd_export(args: argparse.Namespace) -> int:
    import numpy as np

    from export import EXPORTERS, export_checkpoint, exporter
    from export.api import check_export_dest
    from hetero.checkpoint import check_same_space, load_checkpoint
    from hetero.data import load_dataset

    edge = load_checkpoint(args.edge, role=("edge", "control", "cloud"))
    cloud = None
    if args.cloud:
        cloud = load_checkpoint(args.cloud, role="cloud")
        check_same_space(edge, cloud)
    check_export_dest(Path(args.out), args.overwrite)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()] if args.formats else None
    if formats is not None:
        for f in formats:
            EXPORTERS.get(f)  # an unknown name fails here, listing the known ones
    if args.calib is not None and args.calib < 1:
        raise HeteroError(f"--calib must be >= 1, got {args.calib}")
    if args.check_samples < 1:
        raise HeteroError(f"--check-samples must be >= 1, got {args.check_samples}")
    options: dict = {"int8_mode": args.int8_mode, "ort.optimization": args.ort_optimization,
                     "coreml.image_input": args.coreml_image_input}
    if args.batch_sizes:
        options["batch_sizes"] = _int_list(args.batch_sizes, "--batch-sizes")
    trained_on = str(edge.info.get("dataset", ""))
    own_data = args.data is not None or trained_on.startswith("fashion-mnist")
    inputs, desc, calib, gallery, gallery_desc = None, None, None, None, ""
    if args.data or args.check_real or cloud is not None:
        ds = load_dataset(args.data, "test", progress=not args.quiet).conform(edge.preprocess)
        ds = ds.subset(min(args.check_samples, len(ds)))
        inputs, desc = edge.preprocess.apply(ds.images), f"{ds.name} ({len(ds)} images)"
    asked_int8 = formats is not None and "onnx-int8" in formats
    wants_calib = args.int8_mode == "static" and (asked_int8 or (formats is None and exporter("onnx-int8").unavailable() is None))
    if wants_calib and not own_data:
        # calibrating on Fashion-MNIST would quantise a model of other images with the wrong ranges
        if asked_int8:
            raise HeteroError(f"onnx-int8 calibrates on the model's training images, but {args.edge} was trained on "
                              f"{trained_on or 'unknown data'}; pass --data DIR with that dataset (or --int8-mode dynamic)")
        wants_calib = False
    train = None
    if wants_calib or cloud is not None:
        train = load_dataset(args.data, "train", progress=not args.quiet)
    if wants_calib:  # calibration: a seeded sample of the training split, never test images
        tr = train.conform(edge.preprocess)
        n = min(args.calib or 512, len(tr))
        pick = np.sort(np.random.default_rng(0).choice(len(tr), n, replace=False))
        calib = edge.preprocess.apply(tr.images[pick])
    if cloud is not None:  # top-10 agreement searches the real cloud gallery (cached cloud embeddings)
        from hetero.embed import cloud_targets

        gallery = np.asarray(cloud_targets(cloud, train.conform(cloud.preprocess), progress=not args.quiet))
        gallery_desc = f"{train.name} ({len(train)} images) embedded by the cloud model {args.cloud}"
    manifest = export_checkpoint(edge, args.out, formats=formats, name=args.name, check_inputs=inputs, check_desc=desc,
                                 calib_inputs=calib, gallery=gallery, gallery_desc=gallery_desc, options=options,
                                 overwrite=args.overwrite, progress=not args.quiet)
    for a in manifest["artifacts"]:
        print(describe_artifact(args.out, a))
    for s in manifest.get("skipped", []):
        print(f"skipped {s['format']}: {s['reason']}")
    total = sum(a.get("seconds", 0.0) for a in manifest["artifacts"])
    print(f"{len(manifest['artifacts'])} artifact(s) in {args.out} ({total:.1f} s of conversion and checks); manifest: "
          f"{Path(args.out) / 'manifest.json'}")
    return 0


def describe_artifact(out: str, a: dict) -> str:
    """One line per manifest entry: what, size, and fidelity with its label."""
    head = f"{a['export_format']:<15} "
    if a.get("file") is None:
        return head + f"{a.get('note', 'not built here')}; build on the target with: {a.get('build_command', '?')}"
    size = f"{a['bytes']:,} bytes" + (f" ({a['weight_bytes']:,} of weights)" if a.get("weight_bytes") else "")
    f = a["fidelity"]
    if f.get("label") == "pending":
        fid = f"fidelity pending: {f.get('reason', '')}"
    else:
        fid = (f"vs torch: min cosine {f['min_cosine']:.7f}, top-10 agreement {f['top10_agreement']:.2%} "
               f"({f['label']}, {f['runtime']})")
    return head + f"{Path(out) / a['file']}: {size}, {fid}"


def _bench_one(path: str, args: argparse.Namespace) -> dict:
    """Latency JSON of ``path``: read back if it is one, else benched here (or on ``--host``)."""
    import json

    from devices.bench import check_result

    p = Path(path)
    if p.is_file() and p.suffix == ".json" and p.name != "manifest.json":
        try:
            return check_result(json.loads(p.read_text(encoding="utf-8")), str(p))
        except (ValueError, RecursionError):
            raise HeteroError(f"{p} is not valid JSON; pass a latency JSON from `hetero bench --json`, an export "
                              "directory or a checkpoint") from None
    if p.is_file() and p.name == "manifest.json":
        p = p.parent
    if not p.is_dir():
        raise HeteroError(f"{path} is neither an export directory, a checkpoint directory nor a latency JSON")
    runtime = args.runtime
    if runtime is None and not args.profile and (p / "hetero.json").is_file():
        runtime = "torch"  # a checkpoint: the reference runner
    common = dict(runtime=runtime, precision=args.precision, fmt=args.format, profile=args.profile,
                  batch_sizes=_int_list(args.batch, "--batch"), iters=args.iters, budget_s=args.budget, warmup=args.warmup)
    if args.host:  # the profile is resolved there, against the remote host's runtimes
        from devices.remote import remote_bench

        return remote_bench(p, args.host, **common, threads=args.threads, port=args.port, identity=args.identity,
                            python=args.python, ssh_options=tuple(args.ssh_option or ()), timeout=args.timeout)
    from devices.standalone import bench_export

    settings = {"threads": args.threads} if args.threads is not None else {}
    return bench_export(p, **common, progress=not args.quiet, **settings)


def _latency_table(res: dict) -> str:
    rss = lambda r: f"{r['peak_rss_bytes'] / 2**20:.0f} MiB" if r.get("peak_rss_bytes") else "-"  # noqa: E731
    lines = [f"{res['artifact']['path']} ({res['artifact'].get('format')} {res['artifact'].get('precision')}) on "
             f"{res['runtime']} [{res['label']}], settings {res['settings'] or 'default'}, {res['host']['cpu']}, "
             f"{res['host']['usable_cores']} usable cores",
             "| batch | iters | p50 ms | p90 ms | p99 ms | mean ms | std ms | img/s | peak RSS | threads |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["results"]:
        lines.append(f"| {r['batch']} | {r['iterations']} | {r['p50_ms']:.4f} | {r['p90_ms']:.4f} | {r['p99_ms']:.4f} | "
                     f"{r['mean_ms']:.4f} | {r['std_ms']:.4f} | {r['throughput_img_s']:,.0f} | {rss(r)} | {r['threads']} |")
    return "\n".join(lines)


def cmd_bench(args: argparse.Namespace) -> int:
    from devices.bench import compare_table
    from devices.outputs import COMPARE_SCHEMA

    from hetero._atomic import check_output_file, write_json_atomic

    if args.iters is not None and args.budget is not None:
        raise HeteroError("give --iters N or --budget SECONDS, not both")
    kind = "latency comparison" if args.compare else "latency JSON"
    if args.json:
        check_output_file(args.json, kind, args.overwrite)
    if args.compare:
        if len(args.paths) != 2:
            raise HeteroError(f"--compare takes two things to compare (A B), got {len(args.paths)}")
        a, b = (_bench_one(x, args) for x in args.paths)
        print(compare_table(a, b, "A", "B"))
        if args.json:
            check_output_file(args.json, kind, args.overwrite)  # still new or ours after the benchmark
            write_json_atomic(args.json, {"schema": COMPARE_SCHEMA, "a": a, "b": b})
        return 0
    if len(args.paths) != 1:
        raise HeteroError(f"bench takes one export directory or checkpoint (or two with --compare), got {len(args.paths)}")
    res = _bench_one(args.paths[0], args)
    print(_latency_table(res))
    if args.json:
        check_output_file(args.json, kind, args.overwrite)  # still new or ours after the benchmark
        write_json_atomic(args.json, res)
        print(f"latency JSON: {args.json}")
    return 0


def cmd_devices(args: argparse.Namespace) -> int:
    import json

    from devices.profiles import describe
    from devices.runner import RUNNERS

    rows = describe()
    if args.json:
        print(json.dumps({"profiles": rows, "runtimes": {n: RUNNERS[n].unavailable() for n in sorted(RUNNERS)}}, indent=2))
        return 0
    print("| profile | artifact | runtime | runs here | stands for | why not |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['profile']} | {r['format']} {r['precision'] or ''} | {r['runtime']} {r['settings'] or ''} | "
              f"{r['runs_here']} | {r['stands_for']} | {r['why_not'] or ''} |")
    print("\nruntimes: " + "; ".join(f"{n} {'available' if RUNNERS[n].unavailable() is None else '(' + RUNNERS[n].unavailable() + ')'}"
                                    for n in sorted(RUNNERS)))
    return 0


def cmd_pack_runner(args: argparse.Namespace) -> int:
    from devices.standalone import pack_runner
    from hetero._atomic import check_output_file

    out = Path(args.out)
    check_output_file(out, "runner zip", args.overwrite)
    path = pack_runner(out)
    print(f"standalone runner: {path} ({path.stat().st_size:,} bytes); on the device, with python3, numpy and the "
          f"runtime: python3 {path.name} run EXPORT_DIR --input IMAGES_OR_NPY --out emb.npy | "
          f"python3 {path.name} bench EXPORT_DIR --json latency.json")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from hetero.evaluate import evaluate

    evaluate(args.cloud, args.edge, artifact=args.artifact, data=args.data, query_limit=args.query_limit,
             gallery_limit=args.gallery_limit, out=args.out, progress=not args.quiet, update=args.update)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from hetero.verify.run import verify

    report = verify(args.manifest, args.cloud, edge=args.edge, data=args.data, gates=args.gates, out=args.out,
                    index=args.index, runners=args.runtime, query_limit=args.query_limit,
                    gallery_limit=args.gallery_limit, latency=not args.no_latency, html=not args.no_html,
                    progress=not args.quiet, require=args.require)
    return int(report["verdict"]["exit_code"])


def cmd_demo(args: argparse.Namespace) -> int:
    from hetero.demo import DemoConfig, run_demo

    cloud_opts = [f"--{k.replace('_', '-')}" for k in ("cloud_model", "cloud_epochs", "cloud_margin") if getattr(args, k) is not None]
    if cloud_opts and not args.train_cloud:
        raise HeteroError(f"{', '.join(cloud_opts)} set(s) how the cloud is trained, but the demo loads the shipped "
                          "pretrained cloud; add --train-cloud")
    kw = {k: getattr(args, k) for k in ("out", "data", "cloud_model", "cloud_epochs", "cloud_margin", "edge_model", "edge_epochs",
                                          "control_epochs", "train_limit", "gallery_limit", "query_limit", "seed", "gates")
          if getattr(args, k) is not None}
    report = run_demo(DemoConfig(progress=not args.quiet, train_cloud=args.train_cloud, **kw))
    return int(report["verify"]["verdict"]["exit_code"])


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="hetero", description="Train, export and verify edge models compatible with a cloud embedding space.")
    ap.add_argument("--version", action="version", version=f"hetero {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="the whole slice on Fashion-MNIST (quick configuration)")
    p.add_argument("--out", help="output directory (default runs/demo; replaced atomically)")
    p.add_argument("--data", help="Fashion-MNIST folder (default: searched, see README)")
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

    p = sub.add_parser("train-cloud", help="train the cloud embedding model (cosine-classifier cross-entropy)")
    _add_train_args(p, "resnet20")
    p.set_defaults(func=cmd_train_cloud)

    p = sub.add_parser("train-edge", help="train an edge model into a cloud model's embedding space")
    p.add_argument("--cloud", help="cloud checkpoint directory (required unless --resume)")
    _add_train_args(p, "mobilenet_w050")
    p.add_argument("--loss", help="loss weights: influence, alignment, contrastive, relational, ce, logit_distill "
                                  "(default influence=1,alignment=1,relational=1; see README, Which loss when)")
    p.add_argument("--loss-options", help="per-loss options, e.g. alignment.kind=l2,contrastive.temperature=0.1,"
                                          "contrastive.positives=label,relational.k=32,influence.margin=0.2")
    p.add_argument("--targets", choices=("auto", "cached", "online"),
                   help="cloud targets: cached once (memory-mapped) or computed per batch by the frozen cloud; "
                        "auto = online with --augment, else cached")
    p.add_argument("--no-compat", action="store_true", help="train the control: own classifier, no compatibility loss")
    p.add_argument("--arch", help="arch.json from `hetero search`: train that subnet (backbone nas_mbv3)")
    p.add_argument("--init-from", help="supernet directory (`hetero train-supernet`): start from the subnet's shared weights")
    p.set_defaults(func=cmd_train_edge)

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
    p.add_argument("--space", help="JSON file of search-space fields to change from the defaults, e.g. "
                                   '{"stem_stride": 1, "head": 128} (see README, Architecture search)')
    p.add_argument("--seed", type=int)
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out (from its last saved step)")
    p.add_argument("--save-every", type=int, metavar="N", help="also save the training state every N steps, in "
                                                               "--out/steps (default 200; 0: epoch ends only)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_train_supernet)

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

    p = sub.add_parser("export", help="export a checkpoint to every deployment format, with manifest.json")
    p.add_argument("--edge", required=True, help="checkpoint directory to export")
    p.add_argument("--out", required=True, help="export directory to write (a new one, or an earlier export with --overwrite)")
    p.add_argument("--cloud", help="its cloud checkpoint: refuses an edge model from another space, and the top-10 "
                                   "agreement then searches the real cloud gallery (training split)")
    p.add_argument("--name", default="edge", help="artifact base name (default edge)")
    p.add_argument("--data", help="the model's dataset folder: test images check fidelity, training images calibrate INT8")
    p.add_argument("--check-real", action="store_true", help="check fidelity on Fashion-MNIST test images (found as usual)")
    p.add_argument("--check-samples", type=int, default=1000, help="test images that check fidelity (default 1000)")
    p.add_argument("--formats", help="comma-separated formats: onnx, onnx-fp16, onnx-int8, ort, coreml, coreml-fp16, "
                                     "coreml-int8w, coreml-palette6, coreml-palette4, tensorrt (default: every format "
                                     "this host can produce; the others are listed as skipped, with the reason)")
    p.add_argument("--calib", type=int, help="training images that calibrate INT8 (default 512, seeded sample; "
                                             "never test images)")
    p.add_argument("--int8-mode", choices=("static", "dynamic"), default="static",
                   help="onnx-int8: static QDQ calibrated on training images (default), or dynamic (weights only)")
    p.add_argument("--batch-sizes", help="batch sizes of fixed-shape targets: Core ML EnumeratedShapes, TensorRT "
                                         "profile min/opt/max (default 1,8,32)")
    p.add_argument("--coreml-image-input", action="store_true",
                   help="Core ML takes an image (CVPixelBuffer) whose scale/bias reproduce the preprocessing")
    p.add_argument("--ort-optimization", choices=("fixed", "runtime"), default="fixed",
                   help="ORT Mobile: optimise now for the CPU provider (fixed), or keep portable for NNAPI/Core ML EPs")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier hetero export at --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("evaluate", help="cross-model retrieval: edge queries against the cloud gallery")
    p.add_argument("--cloud", required=True)
    p.add_argument("--edge", required=True)
    p.add_argument("--artifact", help="export directory: also embed the queries through onnxruntime")
    p.add_argument("--data", help="dataset folder (default Fashion-MNIST): test = queries, train = gallery")
    p.add_argument("--query-limit", type=int, help="use the first N test images as queries (N >= 1; default all)")
    p.add_argument("--gallery-limit", type=int, help="use the first N train images as the gallery (N >= 1; default all)")
    p.add_argument("--out", help="write report.json and report.md to this directory")
    p.add_argument("--update", action="store_true", help="name the rows old/new: --cloud is the old cloud, --edge the new "
                                                         "cloud model trained compatible with it")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("verify", help="every exported artifact on every runner here x the cloud gallery; gates -> exit code",
                       description="Embed the queries with every artifact of an export on every runner that can run "
                                   "it here, search the cloud-embedded gallery, score each pair (mAP@R, R@k, "
                                   "compatibility criterion, top-10 overlap, flips, drift vs torch, latency) and apply "
                                   "the gates. Exit 0: all gates pass; 1: a gate or a runner failed; 2: bad input. "
                                   "Gates file: TOML with [all] and [precision.NAME] tables (see hetero/verify/gates.py).")
    p.add_argument("--manifest", required=True, help="export directory (or its manifest.json) written by `hetero export`")
    p.add_argument("--cloud", required=True, help="the cloud checkpoint whose space the export lives in")
    p.add_argument("--edge", help="the torch edge checkpoint that was exported (default: the path the manifest records)")
    p.add_argument("--data", help="dataset folder (default Fashion-MNIST): test = queries, train = gallery")
    p.add_argument("--gates", help="TOML file of thresholds (default: the project's targets)")
    p.add_argument("--out", help="report directory (default: verify/ next to the export directory)")
    p.add_argument("--index", default="exact", choices=("exact", "ivf", "hnsw"),
                   help="top-k search of the gallery: exact (default), or approximate faiss IVF/HNSW, reported with "
                        "its recall against exact search (mAP@R stays exact)")
    p.add_argument("--runtime", action="append", help="only these runners (repeatable), e.g. onnxruntime")
    p.add_argument("--require", action="append", metavar="FORMAT@RUNNER[,...]",
                   help="pairs that must run here (repeatable), e.g. onnx-fp16@onnxruntime,coreml-fp16@coreml-interp: "
                        "one that is skipped or absent fails the verdict (exit 1)")
    p.add_argument("--query-limit", type=int, help="use the first N test images as queries (N >= 1; default all)")
    p.add_argument("--gallery-limit", type=int, help="use the first N train images as the gallery (N >= 1; default all)")
    p.add_argument("--no-latency", action="store_true", help="skip the batch-1 latency p50 of each pair")
    p.add_argument("--no-html", action="store_true", help="write report.json and report.md only (no matplotlib needed)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_verify)

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

    p = sub.add_parser("data", help="find (or download) the dataset and describe it")
    p.add_argument("--data")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("bench", help="latency of an export (or a checkpoint) on a runtime: p50/p90/p99, throughput, RSS")
    p.add_argument("paths", nargs="+", metavar="ARTIFACT_OR_MANIFEST",
                   help="export directory (or its manifest.json), checkpoint directory, or, with --compare, latency JSONs")
    p.add_argument("--runtime", help="runner: onnxruntime, torch, coreml-interp, coreml, tensorrt (default: onnxruntime "
                                     "for an export, torch for a checkpoint)")
    p.add_argument("--profile", help="a device profile (hetero devices lists them): sets format, precision, runtime, settings")
    p.add_argument("--precision", help="which artifact of the export: fp32, fp16, int8, ...")
    p.add_argument("--format", help="which artifact format: onnx, ort, coreml, ...")
    p.add_argument("--batch", default="1,8,32", help="batch sizes (default 1,8,32)")
    p.add_argument("--iters", type=int, help="timed iterations per batch size (default 100)")
    p.add_argument("--budget", type=float, help="seconds per batch size instead of a fixed count")
    p.add_argument("--warmup", type=int, default=10, help="untimed iterations first (default 10)")
    p.add_argument("--threads", type=int, help="runtime threads (default: the runtime's own choice)")
    p.add_argument("--compare", action="store_true", help="two inputs: side-by-side p50 and the ratio B/A")
    p.add_argument("--host", help="user@host: run on that machine over SSH (needs python3, numpy and the runtime there)")
    p.add_argument("--port", type=int, help="SSH port for --host")
    p.add_argument("--identity", help="SSH private key for --host")
    p.add_argument("--python", default="python3", help="the Python on --host that has numpy and the runtime (default python3)")
    p.add_argument("--ssh-option", action="append", help="extra ssh/scp argument for --host, e.g. --ssh-option=-oStrictHostKeyChecking=accept-new")
    p.add_argument("--timeout", type=float, default=600, help="with --host: seconds each ssh/scp step (the copy, the "
                                                              "bench) may take before it is stopped (default 600)")
    p.add_argument("--json", help="write the latency result (schema hetero-latency/1; with --compare "
                                  "hetero-latency-compare/1) here: a new path, or an earlier one with --overwrite")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier latency JSON of the same schema at --json")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("devices", help="device profiles and runtimes, and which can run on this host (and why not)")
    p.add_argument("--json", action="store_true", help="machine-readable")
    p.set_defaults(func=cmd_devices)

    p = sub.add_parser("pack-runner", help="pack the torch-free standalone runner into one zip to copy to a device")
    p.add_argument("out", help="zip file to write, e.g. runner.zip: a new path, or an earlier runner zip with --overwrite")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier runner zip of hetero's at OUT")
    p.set_defaults(func=cmd_pack_runner)

    p = sub.add_parser("cache", help="list (or --clear) the cached embeddings: cloud targets (train-edge) and "
                                        "verify's torch embeddings")
    p.add_argument("--clear", action="store_true", help="delete them (they are recomputed when next needed)")
    p.add_argument("--space", help="only the files of models (a cloud: its space) whose fingerprint starts with this")
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser("models", help="list registered backbones with params and FLOPs")
    p.set_defaults(func=cmd_models)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    old_handler = _catch_sigterm()
    try:
        return int(args.func(args) or 0)
    except BaseException as e:
        return _report(e, args)
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)


def _report(e: BaseException, args: argparse.Namespace) -> int:
    """Print the one ``error:`` line for what ended the command and return the exit status; anything
    that is neither bad input, a full disk nor an interruption is a bug and is raised again."""
    from devices.errors import DeviceError

    stop = _interruption(e)
    if stop is not None:  # Ctrl-C, or SIGTERM as Terminated; a message, if any, says what was kept
        # CPython quirk: a KeyboardInterrupt that passed through a string exec (torch's exporter makes
        # some) makes `python -m` die by SIGINT at exit whatever we return; any later string exec clears it
        exec("pass", {})
        what = "terminated (SIGTERM)" if isinstance(stop, Terminated) else "interrupted"
        print(f"error: {what}; {str(stop) or 'partial outputs were discarded'}", file=sys.stderr)
        return 143 if isinstance(stop, Terminated) else 130
    if isinstance(e, (HeteroError, DeviceError)) or (isinstance(e, Exception) and _disk_full(e, args)):
        # a full or read-only disk is the environment's fault, not a bug: one line too
        print(f"error: {_disk_full(e, args) or e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    raise e


def _interruption(e: BaseException | None) -> KeyboardInterrupt | None:
    """The KeyboardInterrupt that caused ``e``, if any (libraries such as torch.export wrap it)."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _disk_full(e: BaseException, args: argparse.Namespace) -> str | None:
    why = write_failure(e)
    if why is None:
        return None
    out = getattr(args, "out", None) or getattr(args, "json", None)
    return f"{'cannot write ' + str(out) + ': ' if out else ''}{why}; free some space or choose another output path"


def _catch_sigterm():
    """Turn SIGTERM into :class:`Terminated` (once: a second one during the cleanup is ignored).
    Returns the handler to restore, or None off the main thread, where signals cannot be caught."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def on_term(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated()

    return signal.signal(signal.SIGTERM, on_term)


if __name__ == "__main__":
    sys.exit(main())
