import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from devices import DeviceError, create_runner, open_artifact
from hetero.checkpoint import load_checkpoint


def test_onnxruntime_runner_matches_torch(saved, synth, prep):
    x = prep.apply(synth[1].images)
    edge = load_checkpoint(saved / "edge")
    with torch.no_grad():
        ref = edge.model(torch.from_numpy(x)).numpy()
    with create_runner(saved / "export", "onnxruntime", batch_size=64) as r:
        got = r.embed(x)
        assert r.embed(x[:0]).shape == (0, 16)
        assert "onnxruntime" in r.runtime
    assert got.dtype == np.float32 and got.shape == ref.shape
    cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() >= 0.99999
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_runner_rejects_bad_batches(saved):
    with create_runner(saved / "export") as r:
        with pytest.raises(DeviceError, match=r"shape \(2, 3, 28, 28\)"):
            r.embed(np.zeros((2, 3, 28, 28), np.float32))
        with pytest.raises(DeviceError, match="shape"):
            r.embed(np.zeros((1, 28, 28), np.float32))
        bad = np.zeros((2, 1, 28, 28), np.float32)
        bad[1, 0, 0, 0] = np.nan
        with pytest.raises(DeviceError, match="NaN"):
            r.embed(bad)


def test_tampered_or_missing_artifacts_are_refused(tmp_path, saved):
    d = tmp_path / "export"
    shutil.copytree(saved / "export", d)
    with open(d / "edge.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(DeviceError, match="sha256"):
        open_artifact(d)
    (d / "edge.onnx").unlink()
    with pytest.raises(DeviceError, match="missing"):
        open_artifact(d)
    (d / "manifest.json").write_text("{")
    with pytest.raises(DeviceError, match="not valid JSON"):
        open_artifact(d)
    (d / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(DeviceError, match="not a hetero export manifest"):
        open_artifact(d)
    with pytest.raises(DeviceError, match="no manifest.json"):
        open_artifact(tmp_path)
    with pytest.raises(DeviceError, match="no coreml artifact"):
        open_artifact(saved / "export", "coreml")
    with pytest.raises(DeviceError, match="unknown runtime"):
        create_runner(saved / "export", "tflite")


def test_runner_core_imports_neither_torch_nor_hetero():
    code = ("import sys; import devices; import devices.runner, devices.artifact, devices.onnxruntime_runner; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'hetero', 'export')]; print(bad); assert not bad")
    subprocess.run([sys.executable, "-c", code], check=True)
