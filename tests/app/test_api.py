"""The Python API (``hetero.train_cloud``, ``hetero.export``, ...): typed arguments in, result objects
out, the same checks as the commands, and ``import hetero`` that loads none of it until it is used."""
import json
import subprocess
import sys

import pytest

import hetero
from hetero.errors import HeteroError

LOOSE = "[all]\ncompatibility_criterion = false\nmax_gap_to_paragon = 1.0\nmax_negative_flip_rate = 1.0\n"


def test_import_hetero_is_cheap_and_names_its_api():
    code = ("import sys, hetero; assert 'torch' not in sys.modules, 'torch loaded'; "
            "print(sorted(n for n in dir(hetero) if not n.startswith('_')))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-800:]
    names = set(eval(p.stdout))
    assert {"train_cloud", "train_edge", "export", "verify", "bench", "search", "evaluate"} <= names
    for name in hetero._API:  # every name the package promises loads
        assert getattr(hetero, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        hetero.nothing  # noqa: B018


def test_train_returns_the_checkpoint_and_its_history(tmp_path):
    cloud = hetero.train_cloud(tmp_path / "cloud", data="synthetic",
                               config={"model": "test_resnet", "dim": 8, "epochs": 1, "limit": 96}, progress=False)
    assert isinstance(cloud, hetero.TrainResult) and cloud.path == tmp_path / "cloud"
    assert (cloud.path / "hetero.json").is_file() and not (tmp_path / "cloud.resume").exists()
    assert cloud.space == cloud.checkpoint.fingerprint and len(cloud.history) == 1 and "total" in cloud.history[0]
    edge = hetero.train_edge(cloud.path, tmp_path / "edge", data="synthetic",
                             config={"model": "test_mobilenet", "epochs": 1, "limit": 96}, progress=False)
    assert edge.checkpoint.role == "edge" and edge.space == cloud.space and edge.checkpoint.spec.dim == 8  # the cloud's
    control = hetero.train_edge(cloud.path, tmp_path / "control", data="synthetic", compat=False,
                                config={"model": "test_mobilenet", "epochs": 1, "limit": 96}, progress=False)
    assert control.checkpoint.role == "control"
    with pytest.raises(HeteroError, match="needs --out"):
        hetero.train_cloud(data="synthetic")
    with pytest.raises(HeteroError, match="already holds a hetero cloud checkpoint"):  # not replaced without overwrite
        hetero.train_cloud(tmp_path / "cloud", data="synthetic", config={"model": "test_resnet", "epochs": 1})
    with pytest.raises(HeteroError, match="unknown training option"):
        hetero.train_cloud(tmp_path / "c2", data="synthetic", config={"epoch": 1})


def test_export_verify_bench_evaluate_return_results(tmp_path, saved):
    exp = hetero.export(saved / "edge", tmp_path / "x", cloud=saved / "cloud", data="synthetic", formats=["onnx"],
                        check_samples=50, progress=False)
    assert isinstance(exp, hetero.ExportResult) and exp.path == tmp_path / "x" and exp.skipped == []
    (a,) = exp.artifacts
    assert a["export_format"] == "onnx" and (exp.path / a["file"]).is_file() and a["fidelity"]["min_cosine"] > 0.999
    assert json.loads((exp.path / "manifest.json").read_text()) == exp.manifest

    (tmp_path / "loose.toml").write_text(LOOSE)
    checked = hetero.verify(exp.path, saved / "cloud", data="synthetic", gates=tmp_path / "loose.toml", latency=False,
                            html=False, query_limit=40, gallery_limit=200, progress=False, log=lambda _: None)
    assert isinstance(checked, hetero.VerifyResult) and checked.path == tmp_path / "verify"
    assert checked.exit_code == 0 and checked.passed
    assert json.loads((checked.path / "report.json").read_text())["verdict"] == checked.report["verdict"]

    lat = hetero.bench(exp.path, batch_sizes=[2, 1], iters=3, warmup=1, threads=1, progress=False)
    assert isinstance(lat, hetero.LatencyResult) and [r["batch"] for r in lat.results] == [1, 2]
    assert lat.p50_ms(1) > 0 and lat.data["schema"] == "hetero-latency/1"
    with pytest.raises(HeteroError, match="no batch 4 was timed"):
        lat.p50_ms(4)
    saved_json = hetero.save_latency(lat, tmp_path / "lat.json")
    assert hetero.bench(saved_json).data == lat.data  # a latency JSON reads back
    with pytest.raises(HeteroError):
        hetero.save_latency(lat, tmp_path / "lat.json")  # not replaced without overwrite
    hetero.save_latency(lat, tmp_path / "lat.json", overwrite=True)

    found = hetero.evaluate(saved / "cloud", saved / "edge", data="synthetic", query_limit=40, gallery_limit=200,
                            progress=False, log=lambda _: None)
    assert isinstance(found, hetero.EvaluateResult) and found.path is None
    pairs = {(r["query_model"], r["gallery_model"]) for r in found.retrieval}
    assert {("cloud", "cloud"), ("edge", "cloud"), ("edge", "edge")} <= pairs
    assert isinstance(found.compatible, bool)


def test_api_refuses_what_the_commands_refuse(tmp_path, saved):
    with pytest.raises(HeteroError, match="unknown|choose"):
        hetero.export(saved / "edge", tmp_path / "x", formats=["onnx-int3"], progress=False)
    with pytest.raises(HeteroError, match="--iters N or --budget"):
        hetero.bench(saved / "export", iters=3, budget_s=1.0)
    assert not (tmp_path / "x").exists()
