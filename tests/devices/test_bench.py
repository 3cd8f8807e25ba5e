"""The latency harness, the runners' registry and settings, device profiles, and `hetero bench/devices`."""
import json
import time

import numpy as np
import pytest

from devices import DeviceError, bench, create_runner
from devices.bench import SCHEMA, _stats, check_result, compare_table, time_calls
from devices.profiles import PROFILES, describe, profile, runner_for
from hetero.app.cli import main


def test_stats_units_and_percentiles():
    ns = [1_000_000, 2_000_000, 3_000_000, 4_000_000, 10_000_000]  # 1..4 ms and one 10 ms outlier
    s = _stats(ns, batch=8)
    assert s["p50_ms"] == 3.0 and s["mean_ms"] == 4.0 and s["min_ms"] == 1.0 and s["iterations"] == 5
    assert s["p90_ms"] == pytest.approx(np.percentile([1, 2, 3, 4, 10], 90))
    assert s["throughput_img_s"] == pytest.approx(8 * 1000 / 4.0)


def test_time_calls_counts_and_budget():
    calls = []
    times = time_calls(lambda: calls.append(1), warmup=3, iters=7, budget_s=None)
    assert len(times) == 7 and len(calls) == 10  # warm-up calls are not timed
    t0 = time.perf_counter()
    times = time_calls(lambda: time.sleep(0.01), warmup=0, iters=None, budget_s=0.1)
    took = time.perf_counter() - t0
    assert len(times) >= 5 and 0.09 <= took < 2.0  # stops soon after the budget, even on a loaded CI machine
    assert min(times) >= 9_000_000  # each call slept 10 ms


def test_bench_onnxruntime_schema_and_consistency(saved):
    with create_runner(saved / "export", "onnxruntime", threads=1) as r:
        res = bench(r, (1, 4), warmup=2, iters=20)
    assert res["schema"] == SCHEMA and res["label"] == "measured" and res["settings"] == {"threads": 1}
    assert res["artifact"]["sha256"] == json.loads((saved / "export" / "manifest.json").read_text())["artifacts"][0]["sha256"]
    assert res["host"]["cpu"] and res["host"]["cores"] >= 1 and "onnxruntime" in res["versions"]
    for row, b in zip(res["results"], (1, 4)):
        assert row["batch"] == b and row["iterations"] == 20
        assert 0 < row["min_ms"] <= row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]
        assert row["throughput_img_s"] == pytest.approx(b * 1000 / row["mean_ms"])
        assert row["peak_rss_bytes"] > 10 * 2**20 and row["threads"] >= 1
    json.dumps(res)  # JSON-serialisable as is
    assert check_result(json.loads(json.dumps(res))) == res


def test_torch_runner_matches_onnxruntime(saved, synth, prep):
    x = prep.apply(synth[1].images[:40])
    with create_runner(saved / "edge", "torch", threads=1) as t, create_runner(saved / "export", "onnxruntime") as o:
        a, b = t.embed(x), o.embed(x)
        assert "torch" in t.runtime and t.artifact.dim == 16
    np.testing.assert_allclose(a, b, atol=1e-5)
    with pytest.raises(DeviceError, match="is an export directory"):
        create_runner(saved / "export", "torch")


def test_runner_settings_and_providers_are_checked(saved):
    with pytest.raises(DeviceError, match="has no setting compute_units"):
        create_runner(saved / "export", "onnxruntime", compute_units="ALL")
    with pytest.raises(DeviceError, match="onnxruntime has no CUDAExecutionProvider here"):
        with create_runner(saved / "export", "onnxruntime", providers=["CUDAExecutionProvider"]):
            pass
    with pytest.raises(DeviceError, match="graph optimisation level"):
        with create_runner(saved / "export", "onnxruntime", optimization="max"):
            pass
    with pytest.raises(DeviceError, match="runs onnx, ort artifacts, not coreml"):
        create_runner(saved / "export", "onnxruntime", fmt="coreml")


def test_profiles():
    assert {"host-cpu", "host-cpu-1thread", "iphone-coreml", "android-ort", "jetson-trt", "nvidia-trt"} <= set(PROFILES)
    rows = {r["profile"]: r for r in describe()}
    assert rows["host-cpu-1thread"]["runs_here"] == "yes" and rows["host-cpu-1thread"]["settings"] == {"threads": 1}
    assert rows["nvidia-trt"]["runs_here"] == "no" and "tensorrt" in rows["nvidia-trt"]["why_not"]
    assert runner_for(profile("host-cpu")) == ("onnxruntime", None)
    with pytest.raises(DeviceError, match="unknown device profile 'pixel'"):
        profile("pixel")


def test_cli_bench_json_compare_and_devices(saved, tmp_path, capsys):
    a, b = tmp_path / "edge.json", tmp_path / "ckpt.json"
    assert main(["bench", str(saved / "export"), "--batch", "1,2", "--iters", "5", "--threads", "1", "--json", str(a),
                 "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "| batch | iters | p50 ms" in out and "[measured]" in out and "latency JSON" in out
    assert main(["bench", str(saved / "edge"), "--batch", "1,2", "--iters", "5", "--json", str(b), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["bench", str(a), str(b), "--compare"]) == 0  # two JSONs: nothing re-run
    out = capsys.readouterr().out
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    want = rb["results"][0]["p50_ms"] / ra["results"][0]["p50_ms"]
    assert f"| 1 | {ra['results'][0]['p50_ms']:.4f} | {rb['results'][0]['p50_ms']:.4f} | {want:.2f}x |" in out
    assert main(["bench", str(saved / "export"), "--profile", "host-cpu-1thread", "--batch", "1", "--iters", "3",
                 "--quiet"]) == 0
    assert "{'threads': 1}" in capsys.readouterr().out
    assert main(["devices"]) == 0
    out = capsys.readouterr().out
    assert "| host-cpu-1thread |" in out and "| nvidia-trt |" in out and "runtimes:" in out


@pytest.mark.parametrize("argv,msg", [
    (["--profile", "pixel"], "unknown device profile"),
    (["--iters", "3", "--budget", "1"], "not both"),
    (["--batch", "0"], "--batch"),
    (["--runtime", "tflite"], "unknown runtime"),
    (["--precision", "int4"], "has no onnx artifact of precision int4"),
])
def test_cli_bench_bad_input(saved, capsys, argv, msg):
    assert main(["bench", str(saved / "export"), "--quiet", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_compare_needs_shared_batches(saved):
    with create_runner(saved / "export") as r:
        a = bench(r, (1,), warmup=0, iters=3)
        b = bench(r, (2,), warmup=0, iters=3)
    with pytest.raises(DeviceError, match="share no batch size"):
        compare_table(a, b)
