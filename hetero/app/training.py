"""Training, as the Python API and the `hetero train-*`, `import-cloud` and `fit-classifier` commands
do it: find the data, resolve the options, keep resumable state, train, and write the checkpoint
atomically (rank 0 alone under torchrun)."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from hetero import distributed
from hetero._resume import Snapshots, absolute, continue_from, interrupted, recorded, snapshots_for
from hetero.app.options import train_config
from hetero.app.search import read_arch
from hetero.checkpoint import Checkpoint, check_checkpoint_dest, load_checkpoint, save_checkpoint
from hetero.data import FASHION_MNIST_PREPROCESS, ImageSet, Preprocess, data_source, load_dataset
from hetero.data.loader import pixel_stats
from hetero.errors import HeteroError
from hetero.imported_cloud import fit_classifier as _fit_classifier
from hetero.imported_cloud import import_cloud as _import_cloud
from hetero.models.library import PREFIXES, library_defaults
from hetero.models.library_weights import find_pretrained
from hetero.nas.train import SupernetConfig, load_supernet
from hetero.nas.train import train_supernet as _train_supernet
from hetero.train import TrainConfig
from hetero.train import train_cloud as _train_cloud
from hetero.train import train_edge as _train_edge


@dataclass(frozen=True)
class TrainResult:
    """A written checkpoint: where, the loaded checkpoint, and its training history (one dict of loss
    terms per epoch)."""
    path: Path
    checkpoint: Checkpoint
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def space(self) -> str:
        """The embedding-space fingerprint the checkpoint lives in (a cloud's own, an edge's cloud's)."""
        return self.checkpoint.space


def real_resolution(model: str, size: int | None) -> tuple[int | None, float | None, dict[str, Any] | None]:
    """``(size, crop, the library's defaults)`` a cloud of ``model`` reads its images at: a
    ``tv:``/``timm:`` model at ``size`` or its native size, centre-cropped as its library evaluates
    (ImageNet: 0.875); any other model at ``size`` (None: the data's own), squashed."""
    lib = library_defaults(model) if model.startswith(PREFIXES) else None
    if lib is None:
        return size, None, None
    return size or int(lib["size"]), float(lib["crop"]), lib


def normalisation(train: ImageSet, size: int | None = None, model: str | None = None) -> Preprocess:
    """The preprocessing a cloud of ``model`` trained on ``train`` uses, at ``size`` (default: the
    model's native size for a ``tv:``/``timm:`` model, else the images'):

    - a ``tv:``/``timm:`` model on colour images: its library's mean and std (ImageNet's) and centre crop;
    - Fashion-MNIST: its published statistics;
    - else the per-channel mean and std of the training images (streamed from the files for a folder)."""
    size, crop, lib = real_resolution(model or "", size)
    c = train.images.shape[-1]
    if lib is not None and c == 3:
        return Preprocess(size, c, tuple(lib["mean"]), tuple(lib["std"]), crop)
    own = _own_statistics(train)
    return replace(own, size=size or own.size, crop=crop)


def _own_statistics(train: ImageSet) -> Preprocess:
    c = train.images.shape[-1]
    if train.name.startswith("fashion-mnist"):
        return FASHION_MNIST_PREPROCESS
    if train.lazy:
        mean, std = pixel_stats(train)
        return Preprocess(train.images.shape[1], c, mean, tuple(max(s, 1e-3) for s in std))
    x = train.images.reshape(-1, c).astype("float64") / 255.0
    return Preprocess(train.images.shape[1], c, tuple(x.mean(0).tolist()), tuple(x.std(0).clip(1e-3).tolist()))


def _train_and_save(train: Callable[[], Checkpoint], out: str | Path, overwrite: bool, snaps: Snapshots,
                    command: str) -> TrainResult:
    """Run ``train()``; rank 0 alone writes the checkpoint to ``out`` and then drops the resume state.
    An interruption keeps the state and says how to resume."""
    try:
        ckpt = train()
        if distributed.is_main():  # under torchrun only rank 0 writes
            save_checkpoint(ckpt, out, overwrite=overwrite)
    except KeyboardInterrupt as e:
        raise interrupted(e, snaps, command) from None
    if distributed.is_main():
        snaps.remove()
    return TrainResult(Path(out), ckpt, list(ckpt.info.get("history", [])))


def train_cloud(out: str | Path | None = None, *, data: str | None = None,
                config: TrainConfig | Mapping[str, Any] | None = None, overwrite: bool = False, progress: bool = True,
                save_every: int | None = None, state_dir: str | Path | None = None,
                resume: str | Path | None = None) -> TrainResult:
    """Train the cloud embedding model (cross-entropy through its cosine classifier) on ``data``
    (default Fashion-MNIST) and write its checkpoint to ``out``. ``config``: a TrainConfig or a mapping
    of its fields (default model resnet20). The training state is saved every ``save_every`` steps
    (default 200) in ``state_dir`` (default ``<out>.resume``); ``resume=DIR`` continues an interrupted
    run with its own options and paths."""
    distributed.init()
    state = None
    if resume:
        state = continue_from(str(resume), "train-cloud")
        run = state["meta"]["run"]
        out, data = recorded("--out", out, run["out"]), recorded("--data", data, run["data"])
        overwrite = overwrite or bool(run.get("overwrite"))
        cfg = train_config(config, resume=state["meta"]["config"])
    else:
        if not out:
            raise HeteroError("train-cloud needs --out DIR (the checkpoint to write), or --resume DIR to continue an "
                              "interrupted run")
        options = dict(config) if isinstance(config, Mapping) else config
        if isinstance(options, dict) and not options.get("model"):
            options["model"] = "resnet20"
        cfg = train_config(options if options is not None else {"model": "resnet20"})
    check_checkpoint_dest(out, "cloud", overwrite)
    if state is None and cfg.pretrained is not None:  # a wrong --pretrained fails before the data are read
        find_pretrained(cfg.model, cfg.pretrained)
    snaps = snapshots_for("train-cloud", state, {"command": "train-cloud", "out": absolute(str(out)),
                                                  "data": data_source(data), "overwrite": overwrite},
                          out=out, resume=resume, state_dir=state_dir, save_every=save_every, overwrite=overwrite,
                          main=distributed.is_main())
    distributed.barrier()
    size, crop, _ = real_resolution(cfg.model, cfg.size)
    train = load_dataset(data, "train", progress=progress and distributed.is_main(), size=size, crop=crop)
    prep = normalisation(train, cfg.size, cfg.model)
    result = _train_and_save(lambda: _train_cloud(cfg, train, prep, progress=progress, snapshots=snaps), out, overwrite,
                             snaps, "train-cloud")
    distributed.barrier()
    return result


def train_edge(cloud: str | Path | None = None, out: str | Path | None = None, *, data: str | None = None,
               config: TrainConfig | Mapping[str, Any] | None = None, compat: bool = True, arch: str | Path | None = None,
               init_from: str | Path | None = None, overwrite: bool = False, progress: bool = True,
               save_every: int | None = None, state_dir: str | Path | None = None,
               resume: str | Path | None = None) -> TrainResult:
    """Train an edge model into the embedding space of the cloud checkpoint ``cloud`` and write it to
    ``out``. ``config``: a TrainConfig or a mapping of its fields (default model mobilenet_w050, dim the
    cloud's). ``compat=False`` trains the control (own classifier, no compatibility loss). ``arch``: an
    arch.json from :func:`hetero.search` (backbone nas_mbv3), started from the subnet's shared weights
    of the supernet ``init_from`` if given. Resumable like :func:`train_cloud`."""
    distributed.init()
    init_state, state = None, None
    if resume:
        state = continue_from(str(resume), "train-edge")
        run = state["meta"]["run"]
        if arch or init_from:
            raise HeteroError("--resume: the model (and the weights it started from) are in the interrupted run's state; "
                              "leave out --arch and --init-from")
        out, data = recorded("--out", out, run["out"]), recorded("--data", data, run["data"])
        cloud = recorded("--cloud", cloud, run["cloud"])
        overwrite = overwrite or bool(run.get("overwrite"))
        cloud_ckpt = load_checkpoint(cloud, role="cloud")
        if cloud_ckpt.space != run.get("cloud_space"):
            raise HeteroError(f"--resume {resume}: the cloud {cloud} is now space {cloud_ckpt.space[:12]}, but the run "
                              f"was training into {str(run.get('cloud_space'))[:12]}; restore that cloud, or start again")
        cfg = train_config(config, resume=state["meta"]["config"], **({} if compat else {"compat": False}))
    else:
        if not out or not cloud:
            raise HeteroError("train-edge needs --cloud DIR and --out DIR, or --resume DIR to continue an interrupted run")
        if init_from and not arch:
            raise HeteroError("--init-from SUPERNET needs --arch arch.json (the subnet to take from it)")
        options = dict(config) if isinstance(config, Mapping) else ({} if config is None else dict(vars(config)))
        fixed: dict[str, Any] = {"compat": compat}
        if arch:
            if options.get("model") or options.get("model_kwargs"):
                raise HeteroError("--arch sets the model; leave out --model and --model-kwargs")
            the_arch, search_space = read_arch(arch)
            options["model"] = "nas_mbv3"
            fixed["model_kwargs"] = {"arch": the_arch.to_dict(), "space": search_space.to_dict()}
            if search_space.resolutions and options.get("size") is None:  # elastic resolution: the subnet's own
                fixed["size"] = the_arch.input_size(search_space)
        options.setdefault("model", None)
        options["model"] = options["model"] or "mobilenet_w050"
        cloud_ckpt = load_checkpoint(cloud, role="cloud")
        if options.get("dim") is None:
            options["dim"] = cloud_ckpt.spec.dim
        if arch and init_from:
            net, meta = load_supernet(init_from)
            if meta.get("cloud_space") != cloud_ckpt.space:
                raise HeteroError(f"--init-from {init_from} was trained into cloud space {str(meta.get('cloud_space'))[:12]}, "
                                  f"not --cloud's {cloud_ckpt.space[:12]}; pass the supernet trained against this cloud")
            if net.space.to_dict() != search_space.to_dict():
                raise HeteroError(f"--arch {arch} belongs to another search space than --init-from {init_from}")
            init_state = net.extract(the_arch).state_dict()
        cfg = train_config(options, **fixed)
    check_checkpoint_dest(out, "edge" if cfg.compat else "control", overwrite)
    if state is None and cfg.pretrained is not None:  # a wrong --pretrained fails before the data are read
        find_pretrained(cfg.model, cfg.pretrained)
    snaps = snapshots_for("train-edge", state, {"command": "train-edge", "out": absolute(str(out)),
                                                 "data": data_source(data), "cloud": absolute(str(cloud)),
                                                 "cloud_space": cloud_ckpt.space, "overwrite": overwrite},
                          out=out, resume=resume, state_dir=state_dir, save_every=save_every, overwrite=overwrite,
                          main=distributed.is_main())
    distributed.barrier()
    train = load_dataset(data, "train", progress=progress and distributed.is_main())
    result = _train_and_save(lambda: _train_edge(cfg, cloud_ckpt, train, progress=progress, init_state=init_state,
                                                 snapshots=snaps), out, overwrite, snaps, "train-edge")
    distributed.barrier()
    return result


@dataclass(frozen=True)
class SupernetResult:
    """A written supernet directory and what its meta records (epochs done, the validation split)."""
    path: Path
    meta: dict[str, Any]


def train_supernet(cloud: str | Path, out: str | Path, *, data: str | None = None,
                   config: SupernetConfig | Mapping[str, Any] | None = None, resume: bool = False,
                   save_every: int | None = None, progress: bool = True) -> SupernetResult:
    """Train the elastic NAS supernet into the cloud's embedding space (sandwich rule), rewriting
    ``out`` after every epoch and saving the training state every ``save_every`` steps (default 200;
    0: epoch ends only); ``resume`` continues an interrupted run in ``out``."""
    cfg = config if isinstance(config, SupernetConfig) else SupernetConfig(**dict(config or {}))
    if save_every is not None and save_every < 0:
        raise HeteroError(f"--save-every must be >= 0 (0: at epoch ends only), got {save_every}")
    distributed.init()
    cloud_ckpt = load_checkpoint(cloud, role="cloud")
    train = load_dataset(data, "train", progress=progress and distributed.is_main())
    try:
        meta = _train_supernet(cfg, cloud_ckpt, train, out, resume=resume, progress=progress,
                               save_every=200 if save_every is None else save_every)
    except KeyboardInterrupt as e:
        if not str(e) and distributed.is_main() and Path(out).exists():
            raise e.__class__(f"the epochs and steps done are kept in {out}; continue with the same command "
                              "and --resume") from None
        raise
    return SupernetResult(Path(out), meta)


def import_cloud(out: str | Path, weights: str | Path, *, dim: int, size: int, channels: int = 3,
                 mean: tuple[float, ...] = (0.485, 0.456, 0.406), std: tuple[float, ...] = (0.229, 0.224, 0.225),
                 torchvision: str | None = None, factory: str | None = None,
                 model_kwargs: Mapping[str, Any] | None = None, overwrite: bool = False) -> TrainResult:
    """Bring your own cloud model: a torchvision model name or a trusted ``module:callable`` factory,
    its weights (safetensors, or a ``.pt`` state dict read with ``weights_only=True``), the embedding
    dim it outputs and its preprocessing, written as a cloud checkpoint (no classifier yet: see
    :func:`fit_classifier`)."""
    if bool(torchvision) == bool(factory):
        raise HeteroError("give exactly one of --torchvision NAME or --factory module:callable")
    check_checkpoint_dest(out, "cloud", overwrite)
    prep = Preprocess(size, channels, tuple(mean), tuple(std))
    kind, name = ("torchvision", torchvision) if torchvision else ("factory", factory)
    ckpt = _import_cloud(kind, name, weights, dim, prep, model_kwargs=dict(model_kwargs or {}))
    save_checkpoint(ckpt, out, overwrite=overwrite)
    return TrainResult(Path(out), ckpt)


def fit_classifier(cloud: str | Path, out: str | Path, *, data: str | None = None, epochs: int = 10,
                   scale: float = 16.0, margin: float = 0.0, overwrite: bool = False,
                   progress: bool = True) -> TrainResult:
    """Fit a cosine classifier on the cloud's frozen embeddings of ``data``'s train split, so the
    influence loss can use it; the result is a new cloud checkpoint (a new space)."""
    cloud_ckpt = load_checkpoint(cloud, role="cloud")
    check_checkpoint_dest(out, "cloud", overwrite)
    train = load_dataset(data, "train", progress=progress)
    ckpt = _fit_classifier(cloud_ckpt, train, epochs=epochs, scale=scale, margin=margin, progress=progress)
    save_checkpoint(ckpt, out, overwrite=overwrite)
    return TrainResult(Path(out), ckpt)
