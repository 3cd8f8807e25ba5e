"""Fuzzing the loaders of files and flags a user hands over: the export manifest, a checkpoint's
hetero.json (ModelSpec, Preprocess), the gates file, latency JSON, and the --loss / --loss-options /
--model-kwargs / --config parsers down to TrainConfig and the losses. Property: each either works
or raises the project's own one-line error (HeteroError / DeviceError), never KeyError, TypeError,
AttributeError, RecursionError, ... Deterministic: a fixed, derandomized hypothesis profile."""
from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devices.errors import DeviceError
from hetero.errors import HeteroError

# HETERO_FUZZ_EXAMPLES=1000 for a longer hunt; the default keeps the suite at a few seconds
FUZZ = settings(derandomize=True, max_examples=int(os.environ.get("HETERO_FUZZ_EXAMPLES", "60")), deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])
OURS = (HeteroError, DeviceError)

scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.sampled_from([0, 1, 2, 3, 28, -1])
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8)
           | st.sampled_from(["onnx", "fp32", "edge.onnx", "../x", "/etc/passwd", "cloud", "batch", "test_resnet"]))
json_values = st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                           max_leaves=10)
deep = st.integers(1, 3000).map(lambda n: "[" * n + "]" * n)  # nesting past the recursion limit


def _paths(doc, prefix=()):
    """Every key path in a JSON document, the root included."""
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, prefix + (i,))


@st.composite
def mutated(draw, base):
    """``base`` with 1-3 values replaced by fuzz, or keys deleted."""
    doc = json.loads(json.dumps(base))
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(doc))
        path = draw(st.sampled_from(paths))
        if not path:
            doc = draw(json_values)
            continue
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        if isinstance(parent, dict) and draw(st.booleans()):
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(json_values)
        if not isinstance(doc, (dict, list)):
            break
    return doc


def _write(path: Path, doc) -> None:
    path.write_text(json.dumps(doc) if not isinstance(doc, str) else doc)


# ------------------------------------------------------------------------------------ export manifest

def _manifest_dir(root: Path) -> tuple[Path, dict]:
    d = root / "export"
    d.mkdir()
    (d / "edge.onnx").write_bytes(b"not really onnx, but the loader only hashes it")
    (d / "edge.fp16.mlpackage").mkdir()
    (d / "edge.fp16.mlpackage" / "Manifest.json").write_text("{}")
    from devices.artifact import sha256_path

    io = {"input": {"name": "input", "shape": ["batch", 1, 28, 28]}, "output": {"name": "embedding", "shape": ["batch", 16]}}
    manifest = {
        "format": "hetero-manifest", "version": 1, "space": "ab" * 32, "dim": 16,
        "model": {"name": "edge", "role": "edge", "checkpoint": "/nowhere", "checkpoint_fingerprint": "cd" * 32},
        "preprocess": {"size": 28, "channels": 1, "mean": [0.5], "std": [0.25]}, "classes": ["a", "b"],
        "artifacts": [
            {"export_format": "onnx", "format": "onnx", "precision": "fp32", "file": "edge.onnx",
             "sha256": sha256_path(d / "edge.onnx"), **io},
            {"export_format": "coreml-fp16", "format": "coreml", "precision": "fp16", "file": "edge.fp16.mlpackage",
             "sha256": sha256_path(d / "edge.fp16.mlpackage"), **io},
            {"export_format": "tensorrt", "format": "tensorrt", "precision": "fp16", "file": None, "status": "build on target"},
        ],
    }
    return d, manifest


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    return _manifest_dir(tmp_path_factory.mktemp("fuzz-manifest"))


def _use_manifest(d: Path) -> None:
    """What bench, run and verify do with a manifest before any runtime is involved."""
    from devices.artifact import load_manifest, open_artifact
    from devices.standalone import check_preprocess

    m = load_manifest(d)
    for fmt in ("onnx", "coreml", "tensorrt"):
        for precision in (None, "fp16"):
            try:
                a = open_artifact(d, fmt, precision)
            except DeviceError:
                continue
            assert a.input_shape and a.dim >= 1 and isinstance(a.format, str) and isinstance(a.space, str)
    try:
        check_preprocess(m.get("preprocess"), "the manifest")
    except DeviceError:
        pass


def test_the_valid_manifest_loads(export_dir):
    d, manifest = export_dir
    _write(d / "manifest.json", manifest)
    _use_manifest(d)


@FUZZ
@given(data=st.data())
def test_manifest_loader(export_dir, data):
    d, manifest = export_dir
    _write(d / "manifest.json", data.draw(mutated(manifest) | json_values | st.text(max_size=40) | deep))
    try:
        _use_manifest(d)
    except OURS:
        pass


@FUZZ
@given(data=st.data())
def test_verify_plans_pairs_from_any_loadable_manifest(export_dir, data):
    from devices.artifact import load_manifest
    from hetero.app.verify.run import plan_pairs

    d, manifest = export_dir
    _write(d / "manifest.json", data.draw(mutated(manifest)))
    try:
        plan_pairs(load_manifest(d), None)
    except OURS:
        pass


@FUZZ
@given(doc=mutated({"schema": "hetero-latency/1", "runtime": "onnxruntime 1", "label": "measured",
                    "artifact": {"path": "x/edge.onnx"}, "results": [{"batch": 1, "p50_ms": 0.1}, {"batch": 8, "p50_ms": 0.5}]}))
def test_latency_json_loader(doc):
    from devices.bench import check_result, compare_table

    try:
        res = check_result(doc)
        compare_table(res, res)
    except OURS:
        pass


# ---------------------------------------------------------------------------------------- checkpoint

@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    """A tiny untrained checkpoint (nothing to learn for a loader) and its hetero.json."""
    from hetero.checkpoint import Checkpoint, save_checkpoint
    from hetero.data import Preprocess
    from hetero.models import CosineClassifier, ModelSpec, create_embedding_model

    spec, prep = ModelSpec("test_resnet", 8), Preprocess(12, 1, (0.5,), (0.25,))
    model = create_embedding_model(spec, 1).eval()
    ckpt = Checkpoint("cloud", spec, model, CosineClassifier(8, 3), prep, ("a", "b", "c"), space="")
    ckpt.space = ckpt.fingerprint
    d = tmp_path_factory.mktemp("fuzz-ckpt") / "cloud"
    save_checkpoint(ckpt, d)
    return d, json.loads((d / "hetero.json").read_text())


def test_the_valid_checkpoint_loads(checkpoint_dir):
    from hetero.checkpoint import load_checkpoint

    d, meta = checkpoint_dir
    _write(d / "hetero.json", meta)
    assert load_checkpoint(d, role="cloud").spec.dim == 8


@FUZZ
@given(data=st.data())
def test_checkpoint_loader(checkpoint_dir, data):
    from hetero.checkpoint import load_checkpoint

    d, meta = checkpoint_dir
    _write(d / "hetero.json", data.draw(mutated(meta) | json_values | st.text(max_size=40) | deep))
    try:
        load_checkpoint(d)
    except HeteroError:
        pass


small = st.integers(-3, 40) | st.sampled_from([0.5, -1.0, float("nan"), 2**80, "8", None, [1], {"a": 1}])


@FUZZ
@given(d=json_values | st.fixed_dictionaries(
    {"backbone": st.sampled_from(["test_resnet", "test_mobilenet", "resnet", "nope"]) | scalars, "dim": small},
    optional={"backbone_kwargs": st.dictionaries(st.sampled_from(["width", "depth", "widths", "blocks", "x"]), small, max_size=2)
              | json_values, "kind": st.sampled_from(["hetero", "torchvision", "factory"]) | scalars}))
def test_model_spec_from_dict(d):
    """ModelSpec.from_dict, and building the model it describes (on the meta device: no allocation)."""
    import torch

    from hetero.models import ModelSpec, create_embedding_model

    try:
        spec = ModelSpec.from_dict(d)
        if spec.kind == "hetero":
            with torch.device("meta"):
                create_embedding_model(spec, 1)
    except HeteroError:
        pass


@FUZZ
@given(d=json_values | st.fixed_dictionaries(
    {"size": small, "channels": small, "mean": st.lists(small, max_size=4) | small, "std": st.lists(small, max_size=4) | small},
    optional={"extra": scalars}))
def test_preprocess_from_dict(d):
    from hetero.data import Preprocess

    try:
        p = Preprocess.from_dict(d)
        assert p.size >= 1 and p.channels in (1, 3) and all(math.isfinite(s) and s > 0 for s in p.std)
    except HeteroError:
        pass


# --------------------------------------------------------------------------------------------- gates

GATE_NAMES = ["compatibility_criterion", "max_gap_to_paragon", "min_drift_cosine", "min_top10_overlap", "bogus"]
gate_tables = st.dictionaries(st.sampled_from(GATE_NAMES) | st.text(max_size=6), scalars | json_values, max_size=3)


@FUZZ
@given(doc=json_values | st.fixed_dictionaries(
    {}, optional={"all": gate_tables | scalars,
                  "precision": st.dictionaries(st.sampled_from(["fp32", "fp16", "int8", "fp8"]) | st.text(max_size=4),
                                               gate_tables | scalars, max_size=3) | scalars,
                  "other": scalars}))
def test_gates_parser(doc):
    from hetero.app.verify.gates import parse_gates, thresholds_for

    try:
        gates = parse_gates(doc, "gates file g.toml")
    except HeteroError:
        return
    for precision in ("fp32", "fp16", "int8", "palette4", None):
        for k, v in thresholds_for(gates, precision).items():
            assert isinstance(v, bool) if k == "compatibility_criterion" else 0 <= abs(v) <= 1


@FUZZ
@given(text=st.text(max_size=80) | st.sampled_from(["[all]\nmax_gap_to_paragon = 0.1\n", "[all\n", "a = [[[[[["]) | deep,
       raw=st.binary(max_size=40))
def test_gates_file(tmp_path, text, raw):
    from hetero.app.verify.gates import load_gates

    for content in (text.encode("utf-8", "surrogatepass"), raw):
        (tmp_path / "g.toml").write_bytes(content)
        try:
            load_gates(str(tmp_path / "g.toml"))
        except HeteroError:
            pass


# ------------------------------------------------------------------------------- flags and --config

LOSS_NAMES = ["influence", "alignment", "contrastive", "relational", "ce", "logit_distill", "triplet"]
OPTION_NAMES = ["temperature", "kind", "positives", "k", "margin", "scale", "bogus"]
values_text = (st.sampled_from(["1", "0.5", "-1", "nan", "inf", "1e400", "true", "null", "\"l2\"", "label", "[1]",
                                "{\"a\": 1}", "", "x=y"]) | st.text(max_size=6) | deep)
kv_text = st.lists(st.tuples(st.sampled_from(LOSS_NAMES) | st.text(max_size=5), values_text), max_size=4).map(
    lambda kv: ",".join(f"{k}={v}" for k, v in kv))
opt_text = st.lists(st.tuples(st.sampled_from(LOSS_NAMES), st.sampled_from(OPTION_NAMES), values_text), max_size=3).map(
    lambda kv: ",".join(f"{a}.{b}={v}" for a, b, v in kv))
any_text = kv_text | opt_text | st.text(max_size=40) | json_values.map(json.dumps) | deep


@FUZZ
@given(loss=st.none() | any_text, options=st.none() | any_text)
def test_loss_flags_to_losses(loss, options):
    """--loss and --loss-options through parse_kv/nest to the composed loss."""
    from hetero.app.options import nest as _nest, parse_kv as _parse_kv
    from hetero.losses import LossContext, WeightedLoss

    try:
        weights = _parse_kv(loss, "--loss")
        opts = _nest(_parse_kv(options, "--loss-options"))
        if weights is not None:
            WeightedLoss(weights, LossContext(dim=8, num_classes=4), opts)
    except HeteroError:
        pass


TRAIN_FIELDS = ["model", "dim", "epochs", "batch_size", "lr", "weight_decay", "seed", "limit", "margin", "augment",
                "model_kwargs", "losses", "loss_options", "targets", "bogus"]


@FUZZ
@given(config=st.none() | st.dictionaries(st.sampled_from(TRAIN_FIELDS), small | scalars | json_values, max_size=4)
       | json_values.map(json.dumps) | st.text(max_size=30) | deep,
       model_kwargs=st.none() | any_text, loss=st.none() | any_text, options=st.none() | any_text,
       flags=st.fixed_dictionaries({}, optional={k: st.integers(-2, 3) for k in ("dim", "epochs", "batch_size", "limit")}))
def test_train_config(tmp_path, config, model_kwargs, loss, options, flags):
    """--config FILE and the flags through train_options/train_config to TrainConfig, its losses and its backbone."""
    import torch

    from hetero.app.cli.train import train_options
    from hetero.app.options import train_config
    from hetero.losses import LossContext, WeightedLoss
    from hetero.models import ModelSpec, create_embedding_model

    path = None
    if config is not None:
        path = tmp_path / "cfg.json"
        path.write_text(config if isinstance(config, str) else json.dumps(config))
    args = argparse.Namespace(config=str(path) if path else None, model="test_mobilenet", dim=None, epochs=None,
                              batch_size=None, lr=None, weight_decay=None, seed=None, limit=None, margin=None,
                              model_kwargs=model_kwargs, augment=False, loss=loss, loss_options=options, targets=None,
                              size=None, pretrained=None)
    for k, v in flags.items():
        setattr(args, k, v)
    try:
        cfg = train_config(train_options(args))
        if cfg.losses:
            WeightedLoss(cfg.losses, LossContext(dim=8, num_classes=4), cfg.loss_options)
        with torch.device("meta"):
            create_embedding_model(ModelSpec(cfg.model, cfg.dim, cfg.model_kwargs or {}), 1)
    except HeteroError:
        pass


def test_deep_json_flags_are_one_line_errors():
    from hetero.app.options import parse_kv as _parse_kv

    with pytest.raises(HeteroError, match="invalid JSON"):
        _parse_kv("{" + '"a":{' * 5000 + "}" * 5001, "--loss")


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@FUZZ
@given(config=st.dictionaries(st.sampled_from(TRAIN_FIELDS[:-1]), small | scalars | json_values, max_size=4))
def test_train_config_is_well_typed(tmp_path, config):
    """What training relies on once TrainConfig accepted the options."""
    from hetero.app.cli.train import train_options
    from hetero.app.options import train_config

    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(config))
    args = argparse.Namespace(config=str(path), model=None, dim=None, epochs=None, batch_size=None, lr=None,
                              weight_decay=None, seed=None, limit=None, margin=None, model_kwargs=None, augment=False,
                              loss=None, loss_options=None, targets=None, size=None, pretrained=None)
    try:
        cfg = train_config(train_options(args))
    except HeteroError:
        return
    assert isinstance(cfg.model, str) and isinstance(cfg.model_kwargs, dict)
    assert all(_int(getattr(cfg, k)) for k in ("dim", "epochs", "batch_size", "seed"))
    assert cfg.limit is None or _int(cfg.limit)
    assert all(isinstance(getattr(cfg, k), (int, float)) and math.isfinite(getattr(cfg, k))
               for k in ("lr", "weight_decay", "margin"))
    assert cfg.losses is None or (isinstance(cfg.losses, dict) and all(isinstance(v, (int, float)) for v in cfg.losses.values()))
    assert cfg.loss_options is None or isinstance(cfg.loss_options, dict)
    assert isinstance(cfg.augment, bool)
