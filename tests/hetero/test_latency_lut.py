"""The latency predictor (``hetero.nas.latency``: blocks, table, prediction) and its measuring side
(``hetero.app.latency``: export and timing on a runner)."""
import json
import math
import random
import subprocess
import sys

import pytest
import torch

from hetero.app import latency as M
from hetero.errors import HeteroError
from hetero.models.complexity import count_flops
from hetero.models.embedding import ModelSpec
from hetero.nas import latency as L
from hetero.nas.space import SearchSpace, largest, sample, smallest
from hetero.nas.supernet import Supernet


def spec(family: str, dim: int = 128, **kw) -> ModelSpec:
    return ModelSpec(family, dim, kw)


MBN = spec("mobilenet", width=0.25, depth=0.5)
RES = spec("resnet", depth=8, width=8)


def test_a_model_spec_builds_the_registered_backbone_in_eval_mode():
    m = L.as_model(spec("resnet", 32, depth=8, width=8), 1)
    assert m.backbone.__class__.__name__ == "CifarResNet" and not m.training
    assert m(torch.zeros(2, 1, 28, 28)).shape == (2, 32)
    assert L.as_model(m, 1) is m


@pytest.mark.parametrize("arch", [spec("mobilenet", 16, width=0.25, depth=0.5), spec("resnet", 16, depth=8, width=8),
                                  spec("mobilenet", 16, width=0.5, depth=1.5), spec("resnet", 16, depth=14, width=12)])
def test_blocks_compose_back_to_the_model(arch):
    model = L.as_model(arch, 1)
    blocks = L.decompose(model, (1, 28, 28))
    backbone = model.backbone
    assert [b.type for b in blocks] == ["conv_bn_relu", *[blocks[1].type] * len(backbone.blocks), "head"]
    assert blocks[-1].config["dim"] == 16
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        y = x
        for b in blocks:
            assert tuple(y.shape[1:]) == b.input_shape
            y = b.module(y)
        torch.testing.assert_close(y, model(x))
    assert sum(count_flops(b.module, b.input_shape) for b in blocks) == count_flops(model, (1, 28, 28))
    assert L.decompose(arch, (1, 28, 28)) == blocks  # from the spec: the same blocks


@pytest.mark.parametrize("space", [
    SearchSpace(stem=8, stages=((8, 1, 1), (12, 2, 2), (16, 2, 2)), kernels=(3, 5), expands=(2, 3), widths=(0.5, 1.0)),
    SearchSpace(stem=8, stem_stride=1, stages=((8, 1, 2), (16, 2, 2)), kernels=(3,), expands=(2,), head=32),
    SearchSpace(in_channels=3, input_size=32)])
def test_a_subnets_blocks_come_from_its_arch_as_from_the_extracted_network(space):
    """``arch_blocks`` reads the genes (the space's resolved blocks); ``decompose`` runs the extracted
    network: the same blocks, so a table filled from either predicts for both."""
    net = Supernet(space, 16).eval()
    rng = random.Random(0)
    for arch in [largest(space), smallest(space), *(sample(space, rng) for _ in range(4))]:
        shape = (space.in_channels, space.input_size, space.input_size)
        assert L.arch_blocks(arch, space, 16) == L.decompose(net.extract(arch), shape)
        assert all(b.module is None for b in L.arch_blocks(arch, space, 16))


def test_decompose_refuses_what_it_does_not_know():
    with pytest.raises(HeteroError, match="cannot decompose"):
        L.decompose(torch.nn.Linear(4, 4), (4,))

    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Conv2d(4, 4, 1))
            self.blocks = torch.nn.Sequential()
            self.pool = torch.nn.AdaptiveAvgPool2d(1)

        def forward(self, x):
            return torch.flatten(self.pool(self.blocks(self.stem(x))), 1)

    with pytest.raises(HeteroError, match="register_block"):
        L.decompose(Odd(), (1, 8, 8))


def test_keys_are_canonical_stable_and_distinct():
    stem = L.decompose(MBN)[0]
    assert stem.key() == (
        '{"batch":1,"config":{"bias":false,"cin":1,"cout":4,"groups":1,"kernel":[3,3],"padding":[1,1],"stride":[1,1]},'
        '"input":[1,28,28],"profile":"host-cpu-1thread","type":"conv_bn_relu"}')
    assert stem.key() == L.decompose(L.as_model(MBN, 1))[0].key()  # another instance, the same key
    keys = {stem.key(), stem.key(batch=8), stem.key(profile="host-cpu"), L.decompose(MBN, (1, 32, 32))[0].key(),
            L.decompose(spec("mobilenet", width=0.5, depth=0.5))[0].key()}
    assert len(keys) == 5
    blocks = L.decompose(spec("resnet", depth=20, width=16))
    distinct = {b.key() for b in blocks}
    assert len(distinct) == 7  # stem, 3 stage-1 (one key), 2 per later stage (first + repeats), head
    assert all(json.loads(k)["type"] in {"conv_bn_relu", "basic_block", "head"} for k in distinct)


def _table_for(blocks, value=0.125, overhead=0.25):
    t = L.new_table()
    for i, b in enumerate(blocks):
        t["entries"][b.key()] = {"block": b.to_dict(), **{s: value * (i + 1) for s in L.STATS}}
    t["overhead_ms"] = overhead
    t["overhead"] = {"by_stat": {s: overhead for s in L.STATS}}
    return t


def test_table_round_trips_through_json(tmp_path):
    blocks = L.decompose(RES)
    t = _table_for(blocks)
    L.save_table(t, tmp_path / "lut.json")
    assert [p.name for p in tmp_path.iterdir()] == ["lut.json"]  # written atomically, no temp file left
    back = L.load_table(tmp_path / "lut.json")
    assert back == t
    assert L.predict_latency(RES, back) == L.predict_latency(RES, t)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(HeteroError, match="not a hetero latency table"):
        L.load_table(tmp_path / "bad.json")
    with pytest.raises(HeteroError, match="does not exist"):
        L.load_table(tmp_path / "nope.json")


def test_predictor_is_the_sum_of_entries_plus_the_overhead():
    blocks = L.decompose(MBN)
    t = _table_for(blocks)
    want = sum(0.125 * (i + 1) for i in range(len(blocks))) + 0.25
    assert L.predict_latency(MBN, t) == want
    assert L.predict_latency(L.as_model(MBN, 1), t) == want
    assert L.predict_latency(blocks, t) == want
    assert [ms for _, ms in L.predict_breakdown(blocks, t)] == [0.125 * (i + 1) for i in range(len(blocks))]
    t["entries"][blocks[0].key()]["p50_ms"] = 100.0  # only the table's statistic counts
    assert L.predict_latency(MBN, t) == want
    assert L.predict_latency(MBN, L.use_stat(t, "p50_ms")) == want - 0.125 + 100.0
    t["overhead_ms"] = None
    with pytest.raises(HeteroError, match="calibrate_overhead"):
        L.predict_latency(MBN, t)


def test_a_missing_block_is_a_clear_error():
    blocks = L.decompose(MBN)
    t = _table_for(blocks[:-1])
    with pytest.raises(L.MissingBlockError, match=r"no entry for block 5 \(head .* on input \[64, 4, 4\]"):
        L.predict_latency(MBN, t)
    assert L.missing_blocks(blocks + blocks, t) == [blocks[-1]]


@pytest.fixture()
def fake_measure(monkeypatch):
    """No export, no timing: every timed model takes 2 ms, every context model 0.5 ms."""
    exported = []

    def export(module, shape, path):
        exported.append(path.name)
        return path

    def time_files(files, **kw):
        return [{s: (0.5 if p.name.startswith("context") else 2.0) for s in L.STATS} | {"iterations": 7}
                for p, _ in files], "fake runtime"

    monkeypatch.setattr(M, "_export", export)
    monkeypatch.setattr(M, "time_onnx_files", time_files)
    return exported


def test_measurement_is_incremental(fake_measure, tmp_path):
    blocks = L.decompose(spec("resnet", depth=14, width=8))
    distinct = list({b.key(): b for b in blocks}.values())
    path = tmp_path / "lut.json"
    M.measure_lut(blocks[:3], path)
    first = [n for n in fake_measure if n.startswith("block")]
    assert len(first) == len({b.key() for b in blocks[:3]}) == 2
    t = L.load_table(path)
    assert len(t["entries"]) == 2 and t["runtime"] == "fake runtime" and t["host"]["cpu"]
    assert all(e["trimmed_mean_ms"] == 1.5 and e["timed"]["p50_ms"] == 2.0 for e in t["entries"].values())
    fake_measure.clear()
    M.measure_lut(blocks, path)
    assert len([n for n in fake_measure if n.startswith("block")]) == len(distinct) - 2
    assert len(L.load_table(path)["entries"]) == len(distinct)
    fake_measure.clear()
    t = M.measure_lut(blocks, L.load_table(path))
    assert fake_measure == [] and len(t["entries"]) == len(distinct)
    with pytest.raises(HeteroError, match="one table per profile and batch"):
        M.measure_lut(blocks, t, batch=8)
    with pytest.raises(HeteroError, match="ONNX FP32 profiles"):
        M.measure_lut(blocks, None, profile="host-cpu-int8")


def test_missing_blocks_are_measured_into_the_table_and_overhead_is_the_calibrated_median(fake_measure):
    t = L.new_table()
    with pytest.raises(L.MissingBlockError):
        L.predict_latency(MBN, t)
    measured = [{s: 10.0 for s in L.STATS}, {s: 20.0 for s in L.STATS}, {s: 9.0 for s in L.STATS}]
    archs = [MBN, RES, spec("mobilenet", width=0.5, depth=0.5)]
    over = M.calibrate_overhead(t, archs, measured=measured)
    sums = [1.5 * len(L.decompose(a)) for a in archs]
    assert over == sorted(m["trimmed_mean_ms"] - s for m, s in zip(measured, sums))[1]
    assert t["overhead"]["by_stat"]["p50_ms"] == over and len(t["overhead"]["calibration"]) == 3
    assert t["overhead"]["calibration"][1]["model"] == RES.to_dict()  # a spec is named by its dict
    M.calibrate_overhead(t, archs, measured=measured, labels=["a", "b", "c"])
    assert [r["model"] for r in t["overhead"]["calibration"]] == ["a", "b", "c"]
    other = spec("resnet", depth=14, width=12)
    with pytest.raises(L.MissingBlockError, match="measure_lut"):
        L.predict_latency(other, t)
    M.measure_lut(L.decompose(other), t)
    assert L.predict_latency(other, t) == 1.5 * len(L.decompose(other)) + over


def test_the_predictor_imports_neither_export_nor_a_runner_nor_the_application():
    """Table in, prediction out: the predictor and the evolution import no exporter, no runner, no
    application code (read from the source), and predicting loads no exporter or runtime."""
    from imports import imports, modules

    graph = imports(modules())
    for mod in ("hetero.nas.latency", "hetero.nas.evolution"):
        # devices.schema is names and format strings only: no runner, no runtime
        assert not [d for d in graph[mod] - {"devices.schema"}
                    if d.split(".")[0] in ("export", "devices") or d.startswith("hetero.app")]
    code = ("import sys; from hetero.nas import latency as L; from hetero.models import ModelSpec; "
            "a = ModelSpec('mobilenet', 128, {'width': 0.25, 'depth': 0.5}); "
            "bl = L.decompose(a); t = L.new_table(); t['overhead_ms'] = 1.0; "
            "t['entries'].update({b.key(): {'trimmed_mean_ms': 0.5} for b in bl}); "
            "assert L.predict_latency(a, t) == 0.5 * len(bl) + 1.0; "
            "print(sorted({m for m in sys.modules if m.split('.')[0] in ('export', 'onnx', 'onnxruntime') "
            "or m.startswith('hetero.app')}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_a_real_measurement_on_onnxruntime_gives_positive_finite_timings(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxslim")
    arch = spec("mobilenet", 8, width=0.125, depth=0.5)
    blocks = L.decompose(arch)[:1]
    fast = dict(rounds=2, warmup=2, iters=5, budget_s=None)
    t, (whole,) = M.measure(blocks, [arch], tmp_path / "lut.json", **fast)
    assert L.load_table(tmp_path / "lut.json") == t
    assert len(t["entries"]) == 1 and t["runtime"].startswith("onnxruntime") and t["settings"] == {"threads": 1}
    (e,) = t["entries"].values()
    assert e["timed"]["iterations"] == 10 and e["block"]["type"] == "conv_bn_relu"
    for part in ("timed", "context"):
        assert all(0 < e[part][s] < 1000 for s in L.STATS)
    assert all(math.isfinite(e[s]) for s in L.STATS)
    assert all(0 < whole[s] < 1000 for s in L.STATS) and whole["iterations"] == 10
