"""What a manifest may say about its artifacts: the preprocessing rules, and the format, precision and
input shape read from the files themselves (devices._inspect), so that an edited manifest is caught."""
from __future__ import annotations

import json
import math
import shutil

import pytest

from devices import DeviceError, open_artifact
from devices._inspect import inspect_artifact
from devices.artifact import MAX_IMAGE_SIZE, checked_file, load_manifest, preprocess_problem, sha256_path


@pytest.fixture(scope="module")
def onnx_export(tmp_path_factory, saved, synth, prep):
    """The tiny edge as ONNX FP32, FP16, INT8 (static QDQ) and ORT."""
    from export import export_checkpoint
    from hetero.checkpoint import load_checkpoint

    out = tmp_path_factory.mktemp("inspect") / "x"
    export_checkpoint(load_checkpoint(saved / "edge"), out, name="edge", formats=("onnx-fp16", "onnx-int8", "ort"),
                      check_inputs=prep.apply(synth[1].images[:32]), calib_inputs=prep.apply(synth[0].images[:32]))
    return out


def test_onnx_precision_is_read_from_the_file(onnx_export):
    found = {f: inspect_artifact(onnx_export / f) for f in ("edge.onnx", "edge.fp16.onnx", "edge.int8.onnx", "edge.ort")}
    assert {f: (i.format, i.precision) for f, i in found.items()} == {
        "edge.onnx": ("onnx", "fp32"), "edge.fp16.onnx": ("onnx", "fp16"), "edge.int8.onnx": ("onnx", "int8"),
        "edge.ort": ("ort", "fp32")}
    assert "QuantizeLinear" in found["edge.int8.onnx"].evidence and "float16" in found["edge.fp16.onnx"].evidence
    assert found["edge.onnx"].input_dims[1:] == (1, 28, 28)


def test_the_scan_agrees_with_the_onnx_library(onnx_export):
    """A brute-force reference: the onnx package's own parse of the same files."""
    import onnx

    for name in ("edge.onnx", "edge.fp16.onnx", "edge.int8.onnx"):
        model = onnx.load(str(onnx_export / name))
        types = {t.data_type for t in model.graph.initializer}
        ops = {n.op_type for n in model.graph.node}
        want = "int8" if ops & {"QuantizeLinear", "DequantizeLinear"} else \
            "fp16" if onnx.TensorProto.FLOAT16 in types else "fp32"
        assert inspect_artifact(onnx_export / name).precision == want


def test_damaged_or_foreign_files_are_not_judged(tmp_path, onnx_export):
    """Past the hash check, a file the scan cannot read is left to its runtime (which names the problem)."""
    data = (onnx_export / "edge.onnx").read_bytes()
    for name, content in (("t.onnx", data[:3000]), ("g.ort", b"not a flatbuffer" * 10), ("e.plan", b"\0" * 64)):
        (tmp_path / name).write_bytes(content)
        got = inspect_artifact(tmp_path / name)
        assert got.format is None and got.precision is None and got.evidence


def _copy(src, tmp_path):
    d = tmp_path / "x"
    shutil.copytree(src, d)
    return d


def _edit(d, fn):
    m = json.loads((d / "manifest.json").read_text())
    fn(m)
    (d / "manifest.json").write_text(json.dumps(m))


def test_a_relabelled_precision_is_refused(onnx_export, tmp_path):
    d = _copy(onnx_export, tmp_path)
    _edit(d, lambda m: [a.update(precision="int8") for a in m["artifacts"] if a["file"] == "edge.fp16.onnx"])
    with pytest.raises(DeviceError, match=r"edge.fp16.onnx holds fp16 weights .*says precision int8.*re-run"):
        open_artifact(d, "onnx", "int8")
    assert open_artifact(d, "onnx", "fp32").path.name == "edge.onnx"  # the others still open


def test_a_label_more_precise_than_the_file_is_refused_too(onnx_export, tmp_path):
    """Stricter gates, but a lie all the same: ``--precision fp32`` must not pick an FP16 file."""
    d = _copy(onnx_export, tmp_path)
    _edit(d, lambda m: [a.update(precision="fp32") for a in m["artifacts"] if a["file"] == "edge.fp16.onnx"])
    m = load_manifest(d)
    entry = next(a for a in m["artifacts"] if a["file"] == "edge.fp16.onnx")
    with pytest.raises(DeviceError, match="edge.fp16.onnx holds fp16 weights .* says precision fp32"):
        checked_file(d, entry)  # what verify does with every entry


@pytest.mark.coreml
def test_coreml_precision_is_read_from_the_package(saved, tmp_path):
    """Weights compressed or not: the tiny model's tensors are all under coremltools' default threshold,
    so its palettised package holds plain FP32 constants, and is judged as FP32, not refused."""
    pytest.importorskip("coremltools")
    from export import export_checkpoint
    from hetero.checkpoint import load_checkpoint

    edge = load_checkpoint(saved / "edge")
    export_checkpoint(edge, tmp_path / "a", name="edge", formats=("coreml-fp16", "coreml-palette4"))
    export_checkpoint(edge, tmp_path / "b", name="edge", formats=("coreml-int8w", "coreml-palette6"),
                      options={"coreml.weight_threshold": 0})
    got = {f"{d}/{p.name}": inspect_artifact(p).precision
           for d in ("a", "b") for p in sorted((tmp_path / d).glob("*.mlpackage"))}
    assert got == {"a/edge.fp16.mlpackage": "fp16", "a/edge.mlpackage": "fp32", "a/edge.palette4.mlpackage": "fp32",
                   "b/edge.int8w.mlpackage": "int8-weights", "b/edge.mlpackage": "fp32",
                   "b/edge.palette6.mlpackage": "palette6"}
    assert open_artifact(tmp_path / "a", "coreml", "palette4").path.name == "edge.palette4.mlpackage"
    # the same FP32 package under a compressed name with no record of compressing nothing: refused
    d = tmp_path / "a"
    _edit(d, lambda m: [a.pop("compression") for a in m["artifacts"] if a["precision"] == "palette4"])
    with pytest.raises(DeviceError, match="holds fp32 weights .* says precision palette4"):
        open_artifact(d, "coreml", "palette4")


def test_an_entry_of_another_format_is_refused(onnx_export, tmp_path):
    """The ORT entry pointed at the ONNX file (the ONNX entry at the ORT one), hashes swapped to match."""
    d = _copy(onnx_export, tmp_path)

    def swap(m):
        a = next(e for e in m["artifacts"] if e["format"] == "onnx" and e["precision"] == "fp32")
        b = next(e for e in m["artifacts"] if e["format"] == "ort")
        a["file"], b["file"], a["sha256"], b["sha256"] = b["file"], a["file"], b["sha256"], a["sha256"]

    _edit(d, swap)
    with pytest.raises(DeviceError, match="edge.onnx is a onnx file, but its entry says format ort"):
        open_artifact(d, "ort")


def test_an_input_shape_the_file_does_not_take_is_refused(onnx_export, tmp_path):
    """Preprocessing and every input shape edited together (size 32): the ONNX graph still takes 28 px."""
    d = _copy(onnx_export, tmp_path)

    def edit(m):
        m["preprocess"]["size"] = 32
        for a in m["artifacts"]:
            a["input"]["shape"][2:] = [32, 32]

    _edit(d, edit)
    with pytest.raises(DeviceError, match=r"edge.onnx takes inputs \[N, 1, 28, 28\], but its entry says \[N, 1, 32, 32\]"):
        open_artifact(d, "onnx", "fp32")


def test_entries_and_files_must_match_one_to_one(onnx_export, tmp_path):
    d = _copy(onnx_export, tmp_path)
    _edit(d, lambda m: m["artifacts"][1].update(file="edge.onnx", sha256=sha256_path(d / "edge.onnx")))
    with pytest.raises(DeviceError, match="lists edge.onnx for two artifacts"):
        load_manifest(d)
    d = _copy(onnx_export, tmp_path / "b")
    _edit(d, lambda m: m.update(artifacts=[a for a in m["artifacts"] if a["file"] != "edge.int8.onnx"]))
    with pytest.raises(DeviceError, match="no entry for edge.int8.onnx"):
        load_manifest(d)
    (d / "edge.int8.onnx").unlink()  # the file gone too: the formats the export was asked for still tell
    with pytest.raises(DeviceError, match="no entry for onnx-int8, which the export was asked for"):
        load_manifest(d)


GOOD = {"size": 28, "channels": 1, "mean": [0.286], "std": [0.353]}


@pytest.mark.parametrize("change, words", [
    ({"std": [math.inf]}, "preprocess.std [inf] is not finite"),
    ({"std": [0.0]}, "must be positive"),
    ({"std": [-0.1]}, "must be positive"),
    ({"mean": [math.nan]}, "preprocess.mean [nan] is not finite"),
    ({"size": 0}, "1..4096"),
    ({"size": MAX_IMAGE_SIZE + 1}, "1..4096"),
    ({"size": 28.5}, "whole number"),
    ({"size": True}, "whole number"),
    ({"channels": 2}, "not 1 or 3"),
    ({"mean": [0.1, 0.2]}, "one per channel"),
    ({"std": "0.3"}, "list of 1 number"),
    ({"extra": 1}, "exactly size, channels, mean, std"),
])
def test_preprocess_rules(change, words):
    assert preprocess_problem(GOOD) is None
    assert preprocess_problem({**GOOD, "size": 28.0}) is None  # as hetero's Preprocess.from_dict
    assert words in preprocess_problem({**GOOD, **change})


def test_preprocess_rules_match_heteros_own(prep):
    """Whatever hetero's Preprocess accepts at a sane size, the device core accepts too, and an export
    refuses what the device core would refuse."""
    from hetero.data import Preprocess
    from hetero.errors import HeteroError

    assert preprocess_problem(prep.to_dict()) is None
    for bad in ({"std": [math.inf]}, {"std": [0.0]}, {"mean": [math.nan]}, {"channels": 2}):
        with pytest.raises(HeteroError):
            Preprocess.from_dict({**GOOD, **bad})
        assert preprocess_problem({**GOOD, **bad})


def test_hetero_refuses_what_the_device_core_would():
    """hetero's Preprocess has the device core's size bound: no checkpoint can carry a preprocessing
    that its export's runners would refuse."""
    from hetero.data import Preprocess
    from hetero.errors import HeteroError

    with pytest.raises(HeteroError, match=f"up to {MAX_IMAGE_SIZE} px"):
        Preprocess(size=MAX_IMAGE_SIZE * 2, channels=1, mean=(0.5,), std=(0.5,))
    ok = Preprocess(size=MAX_IMAGE_SIZE, channels=1, mean=(0.5,), std=(0.5,))
    assert preprocess_problem(ok.to_dict()) is None
    assert "1..4096" in preprocess_problem({**ok.to_dict(), "size": MAX_IMAGE_SIZE * 2})
