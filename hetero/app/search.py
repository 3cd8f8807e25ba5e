"""`hetero search`: compatibility-aware evolutionary search over a trained supernet (CMP-NAS's search,
under a cost budget as in Once-for-All), wired to data, checkpoints, devices and outputs; the evolution
itself is :mod:`hetero.nas.evolution`.

Reward: edge->cloud mAP@R of the subnet's embeddings of the validation split (carved from the
training split by `train-supernet`, never the test split) against the rest of the training split
embedded by the cloud (cached). Every candidate gets a BatchNorm recalibration on training images
first. Cost: FLOPs or parameters (exact, analytic), or latency: predicted from a latency look-up
table (``--lut``: the sum of the subnet's block entries plus a per-model overhead; missing blocks are
measured into the table as the search meets them), or without a table measured directly on a device
profile's runner (ONNX export + the latency harness, batch 1; slow, for small spaces). Latencies are
memoised per architecture. In a space with elastic resolution (``--space mbv3-224``) every subnet is
scored, costed and timed at its own resolution: the validation and calibration images, loaded at the
cloud's size, are resized to it; the look-up table (``build_lut``) holds blocks at every resolution
the space can produce, each under its own key (a block's key has its input shape).

Outputs: ``pareto.json`` (every evaluated candidate with cost and reward, the front, the best per
budget), ``pareto.png``, and ``arch.json`` (the first budget's choice; ``arch-<budget>.json`` for
each budget), which ``hetero train-edge --arch arch.json --init-from SUPERNET`` fine-tunes; an arch file also records the
preprocessing the subnet takes (the cloud's, at the subnet's resolution: ``arch_preprocess``).
"""
from __future__ import annotations

import io
import json
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from devices.errors import DeviceError
from devices.profiles import profile as get_profile
from devices.schema import ARCH_FORMAT, SEARCH_SCHEMA
from devices.standalone import bench_export
from export import export_checkpoint
from hetero import distributed
from hetero._atomic import atomic_dir, check_output_dest, write_json_atomic
from hetero._progress import progress_bar
from hetero.app.latency import measure, measure_lut
from hetero.checkpoint import Checkpoint, load_checkpoint
from hetero.data import ImageSet, Preprocess, load_dataset
from hetero.embed import cloud_targets, embed_images
from hetero.errors import HeteroError
from hetero.metrics import retrieval_metrics
from hetero.models.embedding import ModelSpec
from hetero.nas import latency as predictor
from hetero.nas.evolution import Budget, Candidates, EvolutionConfig, evolve, format_count, pareto_front, parse_budget
from hetero.nas.space import Arch, SearchSpace, largest, sample, smallest
from hetero.nas.supernet import Supernet, arch_flops, arch_params, recalibrate_bn
from hetero.nas.train import load_supernet, val_split
from hetero.train import TrainConfig, train_edge

SCHEMA = SEARCH_SCHEMA


@dataclass(frozen=True)
class SearchConfig(EvolutionConfig):
    """The evolution's settings (population, generations, ...) and the search's own."""
    calib_images: int = 1024
    val_limit: int | None = None
    seed: int = 0
    lut: str | None = None  # latency budgets: predict from this latency look-up table (measuring missing blocks into it)
    finetune_top: int = 0  # per budget, fine-tune the best N by the supernet proxy and choose by their fine-tuned reward
    finetune_epochs: int = 1
    finetune_losses: dict[str, float] | None = None  # default: the losses the supernet was trained with

    def __post_init__(self):
        super().__post_init__()
        if self.calib_images < 1 or self.finetune_top < 0 or self.finetune_epochs < 1:
            raise HeteroError("search settings out of range: --calib-images >= 1, --finetune-top >= 0, "
                              "--finetune-epochs >= 1")

    @property
    def evolution(self) -> EvolutionConfig:
        return EvolutionConfig(self.population, self.generations, self.parents, self.mutate_prob, self.mutation_share)


def parse_budgets(texts: list[str]) -> list[Budget]:
    """Each ``--budget`` parsed (``hetero.nas.evolution.parse_budget``), a latency budget's device
    profile checked; at least one."""
    out = []
    for text in texts:
        b = parse_budget(text)
        if b.profile is not None:
            try:
                get_profile(b.profile)
            except DeviceError as e:
                raise HeteroError(f"--budget {text}: {e}") from None
        out.append(b)
    if not out:
        raise HeteroError("give at least one --budget, e.g. --budget flops=0.8M")
    return out


class Evaluator:
    """Reward and cost of subnets, memoised by architecture; ``candidates`` is what the evolution
    reads them through."""

    MIN_VAL = 100

    def __init__(self, net: Supernet, meta: dict[str, Any], cloud, train_set, cfg: SearchConfig, progress: bool = True):
        self.net, self.meta, self.cfg, self.cloud = net, meta, cfg, cloud
        prep = cloud.preprocess
        ds = train_set.conform(prep)
        limit = meta["config"].get("limit")
        if limit and limit < len(ds):
            ds = ds.subset(limit)
        if ds.digest() != meta.get("dataset_digest"):
            raise HeteroError("the training data differ from the data the supernet was trained on; pass the same --data")
        tr_idx, va_idx = val_split(len(ds), meta["config"]["val_size"], meta["config"]["seed"])
        if cfg.val_limit:
            va_idx = va_idx[:cfg.val_limit]
        if len(va_idx) < self.MIN_VAL:
            raise HeteroError(f"the validation split has {len(va_idx)} images, too few to score subnets (at least "
                              f"{self.MIN_VAL}); raise --val-limit or train the supernet with a larger --val-size")
        self.gallery_set, self.val_set = ds.subset(tr_idx), ds.subset(va_idx)
        missing = set(np.unique(self.val_set.labels)) - set(np.unique(self.gallery_set.labels))
        if missing:
            raise HeteroError(f"validation classes {sorted(missing)} have no gallery image; use a larger training split")
        self.gallery = np.asarray(cloud_targets(cloud, self.gallery_set, progress=progress))
        self.prep = prep
        self.val_x = torch.from_numpy(prep.apply(self.val_set.images))
        rng = np.random.default_rng(cfg.seed)
        calib = rng.choice(len(self.gallery_set), size=min(cfg.calib_images, len(self.gallery_set)), replace=False)
        cx = torch.from_numpy(prep.apply(self.gallery_set.images[np.sort(calib)]))
        self.calib = [cx[i:i + 256] for i in range(0, len(cx), 256)]
        self.space_dict, self.dim = meta["space"], int(meta["dim"])
        self.records: dict[str, dict[str, Any]] = {}
        self.finetuned: dict[str, dict[str, Any]] = {}
        self.latency: dict[tuple[str, str], float] = {}  # (arch key, profile) -> ms
        self._tables: dict[str, dict[str, Any]] = {}
        self.candidates = Candidates(lambda a: self.reward(a)["map_at_r"], self.cost, self.cost_known)

    def cost(self, arch: Arch, budget: Budget) -> float:
        if budget.kind == "flops":
            return float(arch_flops(arch, self.net.space, self.dim))
        if budget.kind == "params":
            return float(arch_params(arch, self.net.space, self.dim))
        key = (arch.key(), budget.profile)
        if key not in self.latency:
            if self.cfg.lut:
                self.latency[key] = latency_from_table(self.net, arch, self.cfg.lut, budget.profile, self._tables,
                                                       self.cfg.seed)
            else:
                self.latency[key] = latency_on_device(self.net, arch, self.meta, budget.profile)
        return self.latency[key]

    def cost_known(self, arch: Arch, budget: Budget) -> bool:
        """Whether ``cost`` answers without a measurement (a latency is timed once per arch and profile)."""
        return budget.kind != "latency" or (arch.key(), budget.profile) in self.latency

    @torch.no_grad()
    def reward(self, arch: Arch) -> dict[str, Any]:
        key = arch.key()
        if key in self.records:
            return self.records[key]
        t0 = time.perf_counter()
        dev = distributed.device()  # a GPU with HETERO_TRAIN_DEVICE=cuda; the supernet goes back to the CPU after
        self.net.to(dev).set_active(arch)
        try:
            recalibrate_bn(self.net, self.calib)
            self.net.eval()
            q = torch.cat([self.net(self.val_x[i:i + 512].to(dev)).cpu()
                           for i in range(0, len(self.val_x), 512)]).numpy()
        finally:
            self.net.cpu()
        m = retrieval_metrics(q, self.val_set.labels, self.gallery, self.gallery_set.labels)
        rec = {"arch": arch.to_dict(), "map_at_r": m["map_at_r"], "recall_at_1": m["recall_at_1"],
               "flops": int(arch_flops(arch, self.net.space, self.dim)),
               "params": int(arch_params(arch, self.net.space, self.dim)), "seconds": time.perf_counter() - t0}
        self.records[key] = rec
        return rec

    def finetune(self, arch: Arch) -> dict[str, Any]:
        """The subnet extracted with the supernet's weights, fine-tuned ``cfg.finetune_epochs`` on the
        training split minus the validation split, then scored on the validation split like
        :meth:`reward` (memoised). A sharper reward than the supernet proxy for the few finalists:
        weight sharing ranks close archs only roughly."""
        key = arch.key()
        if key in self.finetuned:
            return self.finetuned[key]
        t0 = time.perf_counter()
        losses = self.cfg.finetune_losses or self.meta["config"].get("losses") or {"influence": 1.0}
        tcfg = TrainConfig(model="nas_mbv3", model_kwargs={"arch": arch.to_dict(), "space": self.space_dict}, dim=self.dim,
                           epochs=self.cfg.finetune_epochs, losses=dict(losses), seed=self.cfg.seed)
        ckpt = train_edge(tcfg, self.cloud, self.gallery_set, init_state=self.net.extract(arch).state_dict(), progress=False)
        q = embed_images(ckpt.model, self.val_set, self.prep, progress=False)
        m = retrieval_metrics(q, self.val_set.labels, self.gallery, self.gallery_set.labels)
        rec = {"arch": arch.to_dict(), "proxy_map_at_r": self.reward(arch)["map_at_r"], "map_at_r": m["map_at_r"],
               "recall_at_1": m["recall_at_1"], "epochs": self.cfg.finetune_epochs, "losses": dict(losses),
               "seconds": time.perf_counter() - t0}
        self.finetuned[key] = rec
        return rec

    def best(self, arch: Arch, budget: Budget) -> dict[str, Any]:
        """``arch``'s record with its cost under ``budget``."""
        return {**self.reward(arch), "cost": self.cost(arch, budget)}


def latency_from_table(net: Supernet, arch: Arch, lut: str | Path, profile: str,
                       tables: dict[str, dict[str, Any]] | None = None, seed: int = 0) -> float:
    """Latency (ms) of ``arch`` predicted from the look-up table at ``lut``: the sum of the subnet's
    block entries plus the per-model overhead. Blocks missing from the table are measured into it and
    the file saved (with the overhead calibrated on the smallest, the largest and two random subnets
    if it has none), so a table grows with the search and serves the next one. ``tables`` memoises
    the loaded table per profile."""
    path = Path(lut)
    tables = {} if tables is None else tables
    table = tables.get(profile)
    if table is None:
        table = predictor.load_table(path) if path.exists() else predictor.new_table(profile)
        if table["profile"] != profile:
            raise HeteroError(f"--lut {path} was measured on profile {table['profile']}, but the budget names {profile}; "
                              "pass a table of that profile or a new path")
        tables[profile] = table
    sp = net.space
    if table.get("overhead_ms") is None:
        build_lut(net, path, profile, table=table, seed=seed)
    blocks = predictor.arch_blocks(arch, sp, net.dim)
    if predictor.missing_blocks(blocks, table):  # the modules to export come from the extracted subnet
        measure_lut(predictor.decompose(net.extract(arch), predictor.arch_input_shape(arch, sp)), table,
                    profile=table["profile"], batch=table["batch"], path=path)
    return predictor.predict_latency(blocks, table)


def calibration_archs(space: SearchSpace, seed: int = 0) -> list[Arch]:
    """The subnets the per-model overhead is calibrated on: the smallest, the largest, two random ones
    and, in an elastic-resolution space, a random one at each resolution none of those has."""
    rng = random.Random(seed)
    archs = [smallest(space), largest(space), sample(space, rng), sample(space, rng)]
    have = {a.resolution for a in archs}
    archs += [replace(sample(space, rng), resolution=r) for r in space.resolutions if r not in have]
    return archs


def build_lut(net: Supernet, lut: str | Path | None, profile: str = predictor.DEFAULT_PROFILE, *,
              table: dict[str, Any] | None = None, every_block: bool = False, seed: int = 0,
              **measure_kw: Any) -> dict[str, Any]:
    """The latency look-up table of the supernet's space, measured on this host's runtime for
    ``profile`` (``host-cpu-1thread``: onnxruntime; ``host-torch``: torch) at every resolution the
    space can produce. With ``every_block`` it measures every distinct block of the space
    (``hetero.nas.latency.space_blocks``: a full table, for small spaces; a big space's table grows
    with the search instead); then, if the table has no per-model overhead, it measures the
    calibration subnets (``calibration_archs``) whole and block by block at their resolutions and
    fits the overhead. ``table``: a table to extend (else ``lut`` is read if it exists); saved to
    ``lut`` after each measurement; ``measure_kw`` (rounds, warmup, iters, budget_s) go to
    ``hetero.app.latency.measure``. Returns the table."""
    path = Path(lut) if lut is not None else None
    if table is None:
        table = predictor.load_table(path) if path is not None and path.exists() else predictor.new_table(profile)
    kw = dict(profile=table["profile"], batch=table["batch"], path=path, **measure_kw)
    if every_block:
        measure(predictor.space_blocks(net.space, net.dim), (), table, **kw)
    if table.get("overhead_ms") is None:
        archs = calibration_archs(net.space, seed)
        decomposed, measured, labels = [], [], []
        for res in sorted({a.input_size(net.space) for a in archs}):  # one timing pass per input shape
            group = [a for a in archs if a.input_size(net.space) == res]
            shape = predictor.arch_input_shape(group[0], net.space)
            models = [net.extract(a) for a in group]
            dec = [predictor.decompose(m, shape) for m in models]
            _, stats = measure([b for bl in dec for b in bl], models, table, input_shape=shape, **kw)
            decomposed += dec
            measured += stats
            labels += [json.loads(a.key()) for a in group]
        predictor.fit_overhead(table, decomposed, measured, labels)
        if path is not None:
            predictor.save_table(table, path)
    return table


def arch_preprocess(prep: Preprocess, arch: Arch, space: SearchSpace) -> Preprocess:
    """The preprocessing a searched subnet takes: the cloud's (channels, mean/std, crop), at the
    subnet's resolution (its gene; the space's fixed input size otherwise)."""
    return replace(prep, size=arch.input_size(space))


def latency_on_device(net: Supernet, arch: Arch, meta: dict[str, Any], profile: str) -> float:
    """Batch-1 p50 (ms) of the extracted subnet, exported to ONNX, on the profile's runner here."""
    model = net.extract(arch)
    prep = arch_preprocess(Preprocess.from_dict(meta["preprocess"]), arch, net.space)
    ckpt = Checkpoint("edge", ModelSpec("nas_mbv3", int(meta["dim"]), {"arch": arch.to_dict(), "space": meta["space"]}),
                      model, None, prep, tuple(meta["classes"]), space=meta["cloud_space"])
    with tempfile.TemporaryDirectory() as d:
        export_checkpoint(ckpt, Path(d) / "x", formats=("onnx",), check_inputs=np.zeros((4, *ckpt.input_shape), np.float32))
        try:
            res = bench_export(Path(d) / "x", profile=profile, batch_sizes=(1,), iters=200, warmup=20)
        except DeviceError as e:
            raise HeteroError(f"latency budget: {e}") from None
    return float(res["results"][0]["p50_ms"])


def _legacy_search(d: Path) -> str | None:
    """A search written before output markers."""
    return "search" if (d / "pareto.json").is_file() else None


@dataclass(frozen=True)
class SearchResult:
    """A written search directory: ``pareto.json`` (every candidate scored, the FLOPs Pareto front, the
    best subnet per budget) and an arch file per budget for ``hetero train-edge --arch``."""
    path: Path
    pareto: dict[str, Any] = field(repr=False)
    arch_files: dict[str, Path] = field(default_factory=dict)  # budget as given -> its arch JSON

    @property
    def best(self) -> dict[str, dict[str, Any]]:
        """Per budget: the chosen subnet's arch, cost, FLOPs, params and validation mAP@R."""
        return dict(self.pareto["best"])


def search(supernet: str | Path, cloud: str | Path, budgets: list[str], *, data: str | ImageSet | None = None,
           out: str | Path, cfg: SearchConfig = SearchConfig(), progress: bool = True, log=print) -> SearchResult:
    """`hetero search`: the evolutionary search of the supernet for every budget (``flops=0.8M``,
    ``params=50k``, ``latency=0.5ms@PROFILE``), scored in the cloud's space on a validation split of
    the training data (``data``: its folder or name, or the training ``ImageSet`` itself); writes ``out``
    (pareto.json, pareto.png, arch.json and one arch file per budget)."""
    parsed = parse_budgets(budgets)
    out_dir = Path(out)
    check_output_dest(out_dir, "search", True, _legacy_search)
    net, meta = load_supernet(supernet)
    if cfg.finetune_top and net.space.resolutions:
        raise HeteroError("--finetune-top does not yet work on a space with elastic resolution (train-edge trains at the "
                          "cloud's input size, not the subnet's); leave it at 0 and fine-tune the chosen arch.json")
    cloud_ckpt = load_checkpoint(cloud, role="cloud")
    if meta.get("cloud_space") != cloud_ckpt.space:
        raise HeteroError(f"supernet {supernet} was trained into cloud space {str(meta.get('cloud_space'))[:12]}, but "
                          f"--cloud {cloud} is {cloud_ckpt.space[:12]}; pass the cloud it was trained against")
    train = data if isinstance(data, ImageSet) else load_dataset(data, "train", progress=progress)
    t0 = time.perf_counter()
    ev = Evaluator(net, meta, cloud_ckpt, train, cfg, progress=progress)
    cand = ev.candidates
    total = len(parsed) * cfg.population * (cfg.generations + 1)
    bar = progress_bar(total=total, desc="search (evaluations)", unit="arch", disable=not progress, leave=False)
    rng = random.Random(cfg.seed)
    t_search = time.perf_counter()
    best = {}
    for b in parsed:
        best[b.text] = ev.best(evolve(cand, net.space, b, cfg.evolution, rng, on_eval=lambda: bar.update(1)), b)
    bar.close()
    for b in parsed:  # a later budget's run may have found a better arch that also fits an earlier budget
        top = cand.within(b)[0]
        if top.key() != Arch.from_dict(best[b.text]["arch"], net.space).key():
            best[b.text] = ev.best(top, b)
        r = best[b.text]
        log(f"{b.text}: best mAP@R {r['map_at_r']:.4f} at {format_count(r['flops'])} FLOPs, "
            f"{format_count(r['params'])} params" + (f", {r['cost']:.3f} ms" if b.kind == "latency" else ""))
    seconds = time.perf_counter() - t_search
    t_ft = time.perf_counter()
    if cfg.finetune_top:
        finalists = {b.text: cand.within(b)[:cfg.finetune_top] for b in parsed}
        n_ft = len({a.key() for fin in finalists.values() for a in fin})
        bar = progress_bar(total=n_ft, desc=f"fine-tune finalists ({cfg.finetune_epochs} epochs)", unit="arch",
                           disable=not progress, leave=False)
        for b in parsed:
            for a in finalists[b.text]:
                if a.key() not in ev.finetuned:
                    ev.finetune(a)
                    bar.update(1)
        tuned = [Arch.from_dict(f["arch"], net.space) for f in ev.finetuned.values()]
        for b in parsed:  # the best fine-tuned subnet that fits, whichever budget's finalist it was
            pick = max((a for a in tuned if ev.cost(a, b) <= b.value), key=lambda a: ev.finetuned[a.key()]["map_at_r"])
            best[b.text] = {**ev.best(pick, b), "finetuned_map_at_r": ev.finetuned[pick.key()]["map_at_r"]}
            log(f"{b.text}: after fine-tuning the top {len(finalists[b.text])} for {cfg.finetune_epochs} epochs: "
                f"mAP@R {best[b.text]['finetuned_map_at_r']:.4f} (proxy {best[b.text]['map_at_r']:.4f}) at "
                f"{format_count(best[b.text]['flops'])} FLOPs")
        bar.close()
    records = list(ev.records.values())
    result = {
        "schema": SCHEMA, "label": "measured (rewards on the validation split; latency, if any, "
                 + ("predicted from the look-up table " + str(cfg.lut) if cfg.lut else "timed on this host") + ")",
        "supernet": str(supernet), "cloud": str(cloud), "cloud_space": cloud_ckpt.space,
        "space": meta["space"], "config": asdict(cfg), "budgets": [asdict(b) for b in parsed],
        "validation": {"queries": len(ev.val_set), "gallery": len(ev.gallery_set),
                       "note": "validation split carved from the training split; gallery = the rest, cloud-embedded"},
        "evaluations": len(records), "search_seconds": seconds, "setup_seconds": t_search - t0,
        "finetuned": list(ev.finetuned.values()), "finetune_seconds": time.perf_counter() - t_ft,
        "candidates": records, "pareto_flops": pareto_front(records, "flops"),
        "best": {k: v for k, v in best.items()},
        "latency_ms": {f"{k[1]}:{k[0]}": v for k, v in ev.latency.items()},
    }
    log(f"{len(records)} candidates evaluated in {seconds:.0f} s ({seconds / max(1, len(records)):.2f} s each, BN "
        "recalibration included)")
    with atomic_dir(out_dir, "search", True, _legacy_search) as tmp:
        write_json_atomic(tmp / "pareto.json", result)
        cloud_prep = Preprocess.from_dict(meta["preprocess"])
        for i, b in enumerate(parsed):
            chosen = Arch.from_dict(best[b.text]["arch"], net.space)
            arch_doc = {"format": ARCH_FORMAT, "space": meta["space"], "arch": best[b.text]["arch"], "budget": b.text,
                        "preprocess": arch_preprocess(cloud_prep, chosen, net.space).to_dict(),
                        "cost": best[b.text]["cost"], "flops": best[b.text]["flops"], "params": best[b.text]["params"],
                        "val_map_at_r": best[b.text]["map_at_r"],
                        "val_map_at_r_finetuned": best[b.text].get("finetuned_map_at_r"), "supernet": str(supernet),
                        "cloud_space": cloud_ckpt.space}
            write_json_atomic(tmp / f"arch-{b.slug}.json", arch_doc)
            if i == 0:
                write_json_atomic(tmp / "arch.json", arch_doc)
        png = pareto_plot(result)
        if png is not None:
            (tmp / "pareto.png").write_bytes(png)
    log(f"wrote {out_dir / 'pareto.json'}, {out_dir / 'pareto.png'}, {out_dir / 'arch.json'}")
    return SearchResult(out_dir, result, {b.text: out_dir / f"arch-{b.slug}.json" for b in parsed})


def pareto_plot(result: dict[str, Any]) -> bytes | None:
    """Every candidate's FLOPs against its validation mAP@R, the front, and the choice per budget."""
    try:  # matplotlib is optional (hetero[report]): without it, no plot
        from matplotlib.figure import Figure  # optional: hetero[report]
    except ImportError:
        return None

    recs = result["candidates"]
    fig = Figure(figsize=(6.4, 4.2), dpi=100)
    ax = fig.add_subplot()
    ax.scatter([r["flops"] / 1e6 for r in recs], [r["map_at_r"] for r in recs], s=10, alpha=0.4, label="candidates")
    front = [recs[i] for i in result["pareto_flops"]]
    ax.plot([r["flops"] / 1e6 for r in front], [r["map_at_r"] for r in front], "-o", ms=3, color="C3", label="Pareto front")
    for text, r in result["best"].items():
        ax.scatter([r["flops"] / 1e6], [r["map_at_r"]], marker="*", s=120, color="C2", zorder=5)
        ax.annotate(text, (r["flops"] / 1e6, r["map_at_r"]), fontsize=7, xytext=(4, -10), textcoords="offset points")
    ax.set_xscale("log")
    sizes = result["space"].get("resolutions") or [result["space"].get("input_size", 28)]
    at = f"{sizes[0]}x{sizes[0]}" if len(sizes) == 1 else "at the subnet's resolution"
    ax.set_xlabel(f"MFLOPs per image ({at})")
    ax.set_ylabel("edge->cloud mAP@R (validation split)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def read_arch(path: str) -> tuple[Arch, SearchSpace]:
    """(Arch, SearchSpace) from an arch.json written by `hetero search` (or a bare arch dict), validated.
    An arch of an elastic-resolution space runs at its ``resolution``: the checkpoint made from it
    takes ``arch_preprocess(cloud preprocessing, arch, space)``, as the file's ``preprocess`` records."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HeteroError(f"--arch {path} does not exist; pass the arch.json `hetero search` wrote") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise HeteroError(f"--arch {path} is not valid JSON ({e.__class__.__name__}); pass the arch.json `hetero search` wrote") from None
    if not isinstance(doc, dict):
        raise HeteroError(f"--arch {path} must hold a JSON object")
    if doc.get("format") == ARCH_FORMAT:
        space = SearchSpace.from_dict(doc.get("space"))
        return Arch.from_dict(doc.get("arch"), space), space
    space = SearchSpace()
    return Arch.from_dict(doc, space), space
