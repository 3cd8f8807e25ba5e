"""TensorRT: pre-flight against onnx-tensorrt's operator table, the build-on-target entry with its
trtexec command (hosts without tensorrt or a GPU), FormatCannotExpress, and the engine itself
(only where tensorrt and a CUDA GPU are present)."""
import copy
import importlib.util
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import export.tensorrt as trt_export
import export.tensorrt_build as trt_build
import export.tensorrt_preflight as trt_preflight
from devices import DeviceError, Runner, open_artifact
from devices.artifact import sha256_path
from devices.runner import RUNNERS
from export import export_checkpoint
from export.formats import FormatCannotExpress
from export.tensorrt_preflight import load_table, preflight
from export.tensorrt_trtexec import profile_shapes, trtexec_command
from hetero.checkpoint import load_checkpoint
from hetero.errors import HeteroError


def _trt_and_gpu() -> str | None:
    """Why the engine tests cannot run here, or None."""
    if importlib.util.find_spec("tensorrt") is None:
        return "tensorrt is not installed"
    try:
        importlib.import_module("tensorrt")
    except Exception as e:  # PyPI's placeholder package fails on import
        return f"tensorrt does not import ({e.__class__.__name__})"
    import torch

    return None if torch.cuda.is_available() else "no CUDA GPU"


NO_ENGINE = _trt_and_gpu()


def _model(nodes, inputs, outputs, initializers=(), opset=18):
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _vi(name, shape, t=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, t, shape)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, saved):
    edge = load_checkpoint(saved / "edge")
    out = tmp_path_factory.mktemp("trt") / "x"
    m = export_checkpoint(edge, out, formats=("tensorrt",), name="edge")
    return edge, out, m


# ------------------------------------------------------------------------------------ the table


def test_table_names_its_source_and_covers_the_edge_model(saved):
    t = load_table()
    assert t["source"].startswith("https://github.com/onnx/onnx-tensorrt/") and t["source"].endswith("docs/operators.md")
    assert t["tensorrt_version"].startswith("10.") and t["opset_range"] == [9, 24] and t["retrieved"]
    assert t["op_count"] == len(t["ops"]) == 200
    assert t["ops"]["Det"] == {"supported": False, "types": [], "restrictions": ""}
    assert t["ops"]["Conv"]["supported"] and "FP16" in t["ops"]["Conv"]["types"]
    assert "`axes` must be an initializer" in t["ops"]["ReduceL2"]["restrictions"]
    for r in t["attribute_rules"]:  # every rule names a table op and keeps the table's text
        assert r["restriction"] == t["ops"][r["op"]]["restrictions"] and r["restriction"]
    used = {n.op_type for n in onnx.load(str(saved / "export" / "edge.onnx")).graph.node}
    assert used and all(t["ops"][op]["supported"] for op in used)


# ------------------------------------------------------------------------------------ pre-flight


def test_preflight_of_the_exported_edge_is_ok(saved):
    r = preflight(saved / "export" / "edge.onnx")
    assert r["ok"] and r["problems"] == [] and r["file"] == "edge.onnx"
    assert r["op_counts"]["Conv"] >= 1 and r["nodes"] == sum(r["op_counts"].values())
    assert r["table"]["tensorrt_version"] == load_table()["tensorrt_version"] and r["opset"] == 18


def test_preflight_lists_an_unsupported_op_with_its_node():
    m = _model([helper.make_node("Relu", ["x"], ["r"], name="relu0"), helper.make_node("Det", ["r"], ["y"], name="det1")],
               [_vi("x", [3, 3])], [_vi("y", [])])
    r = preflight(m)
    assert not r["ok"] and r["op_counts"] == {"Det": 1, "Relu": 1}
    (p,) = r["problems"]
    assert p["node"] == "det1" and p["op"] == "Det" and "unsupported (N)" in p["reason"]
    msg = trt_preflight.preflight_message(r)
    assert msg.startswith("tensorrt cannot express op 'Det' (node det1)") and "\n" not in msg


def test_preflight_walks_subgraphs_and_custom_domains():
    then_g = helper.make_graph([helper.make_node("Unique", ["x"], ["u"], name="uniq")], "then", [], [_vi("u", [None])])
    else_g = helper.make_graph([helper.make_node("Identity", ["x"], ["e"], name="ident")], "else", [], [_vi("e", [None])])
    m = _model([helper.make_node("If", ["c"], ["y"], name="if0", then_branch=then_g, else_branch=else_g),
                helper.make_node("Gelu", ["x"], ["z"], name="custom", domain="com.example")],
               [_vi("c", [], TensorProto.BOOL), _vi("x", [4])], [_vi("y", [None]), _vi("z", [4])])
    m.opset_import.append(helper.make_opsetid("com.example", 1))
    r = preflight(m)
    assert r["op_counts"] == {"If": 1, "Unique": 1, "Identity": 1, "com.example::Gelu": 1}
    found = {(p["node"], p["op"]): p for p in r["problems"]}
    assert found[("uniq", "Unique")]["graph"] == "main/if0.then_branch"
    assert "custom-domain" in found[("custom", "Gelu")]["reason"]


def test_preflight_reports_violated_restrictions_with_their_text():
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    nodes = [
        helper.make_node("Resize", ["x", "", "scales"], ["r"], name="resize_cubic", mode="cubic"),
        helper.make_node("MaxPool", ["x"], ["p"], name="pool_dil", kernel_shape=[2, 2], dilations=[2, 2]),
        helper.make_node("Shape", ["x"], ["s"], name="shape0"),
        helper.make_node("Slice", ["s", "one", "two"], ["dyn_axes"], name="slice0"),
        helper.make_node("ReduceSum", ["x", "dyn_axes"], ["rs"], name="sum_dyn", keepdims=1),
        helper.make_node("ReduceMean", ["x", "axes"], ["rm"], name="mean_ok", keepdims=1),
        helper.make_node("Unsqueeze", ["rm", "axes"], ["u"], name="unsq_ok"),
        helper.make_node("TopK", ["x", "k"], ["v", "i"], name="topk_unsorted", axis=-1, sorted=0),
        helper.make_node("RandomNormal", [], ["rn"], name="rand", shape=[2], seed=3.0),
    ]
    inits = [axes, helper.make_tensor("scales", TensorProto.FLOAT, [4], [1, 1, 2, 2]),
             helper.make_tensor("one", TensorProto.INT64, [1], [1]), helper.make_tensor("two", TensorProto.INT64, [1], [2]),
             helper.make_tensor("k", TensorProto.INT64, [1], [2])]
    m = _model(nodes, [_vi("x", [1, 3, 8, 8])], [_vi(o, None) for o in ("r", "p", "rs", "u", "v", "i", "rn")], inits)
    r = preflight(m)
    got = {(v["node"], v["rule"]): v for v in r["violated_rules"]}
    assert set(got) == {("resize_cubic", "Resize.mode"), ("pool_dil", "MaxPool.dilations"),
                        ("sum_dyn", "ReduceSum.axes_initializer"), ("topk_unsorted", "TopK.sorted")}
    table = load_table()["ops"]
    assert got[("resize_cubic", "Resize.mode")]["restriction"] == table["Resize"]["restrictions"]
    assert "mode='cubic'" in got[("resize_cubic", "Resize.mode")]["detail"]
    assert "`dilations` must be empty or all ones" in got[("pool_dil", "MaxPool.dilations")]["restriction"]
    assert "not an initializer" in got[("sum_dyn", "ReduceSum.axes_initializer")]["detail"]
    assert [w["node"] for w in r["warnings"]] == ["rand"]  # seed is ignored: reported, not blocking
    assert not r["ok"] and len(r["problems"]) == 4
    msg = trt_preflight.preflight_message(r)
    assert "op 'Resize' (node resize_cubic)" in msg and "Supported resize modes" in msg and "\n" not in msg
    assert "Resize" in {u["op"] for u in r["unchecked_restrictions"]}  # the iota-axes sentence is not encoded


def test_preflight_rules_on_shapes_branches_and_recurrent_ops():
    then_g = helper.make_graph([helper.make_node("Identity", ["a"], ["same"])], "t", [], [_vi("same", [2])])
    else_g = helper.make_graph([helper.make_node("Identity", ["a"], ["same"])], "e", [], [_vi("same", [2])])
    nodes = [
        helper.make_node("If", ["c"], ["y"], name="if_same_names", then_branch=then_g, else_branch=else_g),
        helper.make_node("GridSample", ["x3", "grid"], ["gs"], name="grid3d"),
        helper.make_node("LSTM", ["seq", "W", "R"], ["ly"], name="lstm_bi", hidden_size=2, direction="bidirectional",
                         activations=["Sigmoid", "Tanh", "Tanh", "Sigmoid", "Relu", "Tanh"]),
        helper.make_node("Dropout", ["a", "ratio", "train"], ["d"], name="drop_train"),
        helper.make_node("Opset99Op", ["a"], ["z"], name="mystery"),
    ]
    inits = [helper.make_tensor("W", TensorProto.FLOAT, [2, 8, 3], np.zeros(48)), helper.make_tensor("R", TensorProto.FLOAT, [2, 8, 2], np.zeros(32)),
             helper.make_tensor("ratio", TensorProto.FLOAT, [], [0.5]), helper.make_tensor("train", TensorProto.BOOL, [], [True])]
    m = _model(nodes, [_vi("c", [], TensorProto.BOOL), _vi("a", [2]), _vi("x3", [1, 2, 3, 4, 5]), _vi("grid", [1, 3, 4, 5, 3]),
                       _vi("seq", [4, 1, 3])], [_vi(o, None) for o in ("y", "gs", "ly", "d", "z")], inits)
    r = preflight(m)
    rules = {v["node"]: v["rule"] for v in r["violated_rules"]}
    assert rules == {"if_same_names": "If.branch_outputs", "grid3d": "GridSample.4d_input",
                     "lstm_bi": "LSTM.bidirectional_activations", "drop_train": "Dropout.training_mode_initializer_false"}
    assert [u["node"] for u in r["unsupported_ops"]] == ["mystery"]
    assert "not in the onnx-tensorrt operator table" in r["unsupported_ops"][0]["reason"]


# ----------------------------------------------------------------------- trtexec and the entry


def test_trtexec_command_and_profile():
    p = profile_shapes((32, 1, 8), (3, 224, 224))
    assert p == {"min": [1, 3, 224, 224], "opt": [8, 3, 224, 224], "max": [32, 3, 224, 224]}
    assert profile_shapes((2, 4, 16, 64), (1, 28, 28))["opt"] == [16, 1, 28, 28]
    cmd = trtexec_command("my model.fp16.onnx", input_name="input", profile=p, plan_file="m.plan", timing_cache_file="m.timing.cache")
    assert cmd == ("trtexec '--onnx=my model.fp16.onnx' --stronglyTyped --minShapes=input:1x3x224x224 "
                   "--optShapes=input:8x3x224x224 --maxShapes=input:32x3x224x224 --saveEngine=m.plan "
                   "--timingCacheFile=m.timing.cache")
    old = trtexec_command("m.onnx", input_name="input", profile=p, plan_file="m.plan", timing_cache_file="c",
                          strongly_typed=False, fp16=True)
    assert "--fp16" in old and "--stronglyTyped" not in old
    with pytest.raises(HeteroError):
        trtexec_command("m.onnx", input_name="input", profile=p, plan_file="m.plan", timing_cache_file="c", fp16=True)
    with pytest.raises(HeteroError, match="positive"):
        profile_shapes((0, 4), (1, 28, 28))


@pytest.mark.skipif(NO_ENGINE is None, reason="tensorrt and a GPU are present: the engine is built (see the engine test)")
def test_build_on_target_entry_here(exported):
    edge, out, m = exported
    arts = {a["export_format"]: a for a in m["artifacts"]}
    assert list(arts) == ["onnx", "onnx-fp16", "tensorrt"]  # its sources are built first
    a = arts["tensorrt"]
    assert a["format"] == "tensorrt" and a["precision"] == "fp16" and a["status"] == "build-on-target"
    assert a["file"] is None and a["sha256"] is None and a["bytes"] is None and a["weight_bytes"] is None
    assert a["made_from"] == "edge.fp16.onnx" and (out / "edge.fp16.onnx").is_file() and (out / "edge.onnx").is_file()
    assert a["note"].startswith("engine not built here: build on target (")
    assert "tensorrt is not installed here" in a["note"] or "no CUDA GPU here" in a["note"]
    assert a["build_command"] == ("trtexec --onnx=edge.fp16.onnx --stronglyTyped --minShapes=input:1x1x28x28 "
                                  "--optShapes=input:8x1x28x28 --maxShapes=input:32x1x28x28 --saveEngine=edge.plan "
                                  "--timingCacheFile=edge.timing.cache")
    assert a["build_command_tensorrt10_fp32_onnx"].startswith("trtexec --onnx=edge.onnx --fp16 --minShapes=input:1x1x28x28")
    assert a["profile"] == {"min": [1, 1, 28, 28], "opt": [8, 1, 28, 28], "max": [32, 1, 28, 28]}
    assert a["input"]["shape"] == ["batch", 1, 28, 28] and a["output"]["shape"] == ["batch", 16]
    assert a["fidelity"]["label"] == "pending" and "build it on the target" in a["fidelity"]["reason"]
    assert a["libraries"]["tensorrt"] is None and a["preflight"]["ok"] and a["preflight"]["problems"] == []
    pre = json.loads((out / a["preflight_file"]).read_text())
    assert a["preflight_file"] == "edge.tensorrt-preflight.json" and pre["ok"] and pre["file"] == "edge.fp16.onnx"
    assert pre["op_counts"]["Cast"] >= 1 and pre["fp32_onnx"]["ok"] and "Cast" not in pre["fp32_onnx"]["op_counts"]
    assert json.loads((out / "manifest.json").read_text())["artifacts"] == m["artifacts"]
    # devices skip a file-less entry, then say there is no tensorrt artifact; the ONNX ones still open
    with pytest.raises(DeviceError, match=r"has no tensorrt artifact .*tensorrt/fp16"):
        open_artifact(out, "tensorrt")
    assert open_artifact(out, "onnx", "fp16").path.name == "edge.fp16.onnx"


def test_graph_tensorrt_cannot_express(tmp_path, saved, monkeypatch):
    edge = load_checkpoint(saved / "edge")
    table = copy.deepcopy(load_table())
    table["ops"]["Conv"] = {"supported": False, "types": [], "restrictions": "injected for the test"}
    monkeypatch.setattr(trt_preflight, "load_table", lambda: table)
    with pytest.raises(FormatCannotExpress) as e:
        export_checkpoint(edge, tmp_path / "explicit", formats=("tensorrt",))
    msg = str(e.value)
    conv = next(n.name for n in onnx.load(str(saved / "export" / "edge.onnx")).graph.node if n.op_type == "Conv")
    assert msg.startswith(f"tensorrt cannot express op 'Conv' (nodes {conv}, ") and "more): " in msg
    assert "injected for the test" in msg and "\n" not in msg and not (tmp_path / "explicit").exists()

    import export.run

    real = export.run.default_formats

    def onnx_family(**kw):  # the default set, less the slow formats that do not bear on this test
        ok, skipped = real(**kw)
        return [f for f in ok if f in ("onnx", "onnx-fp16", "tensorrt")], skipped

    monkeypatch.setattr(export.run, "default_formats", onnx_family)
    m = export_checkpoint(edge, tmp_path / "all", formats=None)
    assert m["export"]["requested"] is None  # the default set: a format that cannot express the graph is skipped
    skipped = {s["format"]: s["reason"] for s in m["skipped"]}
    assert skipped["tensorrt"].startswith("tensorrt cannot express op 'Conv'")
    assert "tensorrt" not in {a["export_format"] for a in m["artifacts"]} and "onnx-fp16" in {a["export_format"] for a in m["artifacts"]}
    pre = json.loads((tmp_path / "all" / "edge.tensorrt-preflight.json").read_text())  # kept: it says why
    assert not pre["ok"] and {p["op"] for p in pre["problems"]} == {"Conv"}


# ------------------------------------------------ the GPU-host code path against a stand-in tensorrt
# Not TensorRT: a stand-in with the documented Python API's shape, so that the build code's logic
# (which file, which flags, the profile, the timing cache, the parser's errors, the manifest entry)
# runs on CPU-only hosts. Whether real TensorRT accepts it is what the engine test checks on a GPU.


class _FakeTrt:
    def __init__(self, version, parse_ok=True, plan=b"PLAN"):
        self.__version__, self.calls, fake = version, [], self
        major = int(version.split(".")[0])

        class Logger:
            WARNING = 2

            def __init__(self, severity):
                pass

        class NetworkDefinitionCreationFlag:
            STRONGLY_TYPED = 0

        class BuilderFlag:
            TF32 = 1

        if major == 10:
            BuilderFlag.FP16 = "FP16"  # removed in TensorRT 11

        class Err:
            def node_name(self):
                return "n_bad"

            def node_operator(self):
                return "Weird"

            def desc(self):
                return "no importer\nfor it"

            def node(self):
                return 3

        class Parser:
            num_errors = 0 if parse_ok else 1

            def __init__(self, network, logger):
                pass

            def parse_from_file(self, path):
                fake.calls.append(("parse", path.rsplit("/", 1)[-1]))
                return parse_ok

            def get_error(self, i):
                return Err()

        class Cache:
            def serialize(self):
                return b"CACHE"

        class Config:
            def set_flag(self, f):
                fake.calls.append(("flag", f))

            def add_optimization_profile(self, p):
                fake.calls.append(("profile", p.shapes))

            def create_timing_cache(self, blob):
                fake.calls.append(("cache_in", bytes(blob)))
                return Cache()

            def set_timing_cache(self, cache, ignore_mismatch):
                pass

            def get_timing_cache(self):
                return Cache()

        class Profile:
            def set_shape(self, name, mn, opt, mx):
                self.shapes = (name, mn, opt, mx)

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags=0):
                fake.calls.append(("network", flags))
                return object()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                return plan

        self.Logger, self.NetworkDefinitionCreationFlag, self.BuilderFlag = Logger, NetworkDefinitionCreationFlag, BuilderFlag
        self.OnnxParser, self.Builder = Parser, Builder


@pytest.mark.parametrize("version", ["10.15.1", "11.4.0"])
def test_build_code_path_per_tensorrt_version(tmp_path, version):
    fake = _FakeTrt(version)
    prof = profile_shapes((1, 8, 32), (1, 28, 28))
    how = trt_build.build_engine(fake, tmp_path / "m.fp16.onnx", tmp_path / "m.onnx", tmp_path / "m.plan",
                                  tmp_path / "m.timing.cache", prof)
    assert (tmp_path / "m.plan").read_bytes() == b"PLAN" and (tmp_path / "m.timing.cache").read_bytes() == b"CACHE"
    calls = dict(fake.calls)
    assert calls["profile"] == ("input", (1, 1, 28, 28), (8, 1, 28, 28), (32, 1, 28, 28))
    if version.startswith("10"):  # weak typing: the FP32 ONNX plus the FP16 flag
        assert calls["parse"] == "m.onnx" and calls["flag"] == "FP16" and calls["network"] == 0
        assert how["built_from"] == "m.onnx" and not how["strongly_typed"]
    else:  # strongly typed from the FP16 ONNX; no precision flag exists any more
        assert calls["parse"] == "m.fp16.onnx" and "flag" not in calls and calls["network"] == 1
        assert how["built_from"] == "m.fp16.onnx" and how["strongly_typed"]
    trt_build.build_engine(fake, tmp_path / "m.fp16.onnx", tmp_path / "m.onnx", tmp_path / "m.plan",
                            tmp_path / "m.timing.cache", prof)  # a rebuild starts from the saved timing cache
    assert [c[1] for c in fake.calls if c[0] == "cache_in"] == [b"", b"CACHE"]


def test_build_code_path_errors_are_one_line(tmp_path):
    prof = profile_shapes((1, 8), (1, 28, 28))
    args = (tmp_path / "m.fp16.onnx", tmp_path / "m.onnx", tmp_path / "m.plan", tmp_path / "c", prof)
    with pytest.raises(HeteroError, match=r"parser rejected m\.onnx: op 'Weird' \(node n_bad\): no importer for it$"):
        trt_build.build_engine(_FakeTrt("10.3.0", parse_ok=False), *args)
    with pytest.raises(HeteroError, match="could not build an engine from m.fp16.onnx"):
        trt_build.build_engine(_FakeTrt("11.0.0", plan=None), *args)
    with pytest.raises(HeteroError, match="older than 10"):
        trt_build.build_engine(_FakeTrt("8.6.1"), *args)


def test_built_entry_on_a_gpu_host_stand_in(tmp_path, exported, monkeypatch):
    """The GPU-host path: the plan built (stand-in tensorrt), then measured through the devices runner
    registered as "tensorrt" (here a stand-in for it that runs the torch model), with the entry the
    exporter gives it."""
    import torch

    from export.formats import ExportJob

    edge, out, _ = exported
    x = np.random.default_rng(0).standard_normal((40, *edge.input_shape)).astype(np.float32)
    with torch.no_grad():
        ref = edge.model.eval()(torch.from_numpy(x)).numpy()
    fake = _FakeTrt("10.15.1")
    seen = []

    class StandInRunner(Runner):
        name, formats = "tensorrt", ("tensorrt",)

        def open(self):
            seen.append((self.artifact.path.name, self.artifact.entry["profile"]["max"][0], self.batch_size))

        @property
        def runtime(self):
            return f"tensorrt {fake.__version__} on {torch.cuda.get_device_name(0)}"

        def _run(self, batch):
            assert len(batch) <= 32  # chunked within the profile
            with torch.no_grad():
                return edge.model(torch.from_numpy(batch)).numpy() + 1e-4

    monkeypatch.setattr(trt_export, "_tensorrt_here", lambda: (fake, None))
    monkeypatch.setitem(RUNNERS, "tensorrt", StandInRunner)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Stand-in GPU")
    job = ExportJob(edge, tmp_path, "edge", x, "40 seeded inputs", ref,
                    built={"onnx": out / "edge.onnx", "onnx-fp16": out / "edge.fp16.onnx"})
    a = trt_export._export_tensorrt(job, out / "edge.fp16.onnx")
    assert seen == [("edge.plan", 32, 32)]
    assert a["status"] == "built" and a["file"] == "edge.plan" and a["sha256"] == sha256_path(tmp_path / "edge.plan")
    assert a["made_from"] == "edge.onnx" and a["runtime"] == "tensorrt 10.15.1 on Stand-in GPU"
    assert a["fidelity"]["label"] == "measured" and a["fidelity"]["min_cosine"] > 0.999
    assert a["fidelity"]["runtime"] == a["runtime"] and a["gpu"] == "Stand-in GPU"
    assert a["timing_cache"] == "edge.timing.cache" and a["build_command"].startswith("trtexec --onnx=edge.fp16.onnx")
    assert a["libraries"]["tensorrt"] == "10.15.1" and (tmp_path / "edge.tensorrt-preflight.json").is_file()


# ------------------------------------------------------------------------- the engine (GPU host)


@pytest.mark.tensorrt
@pytest.mark.skipif(NO_ENGINE is not None, reason=f"engine build needs tensorrt and a CUDA GPU: {NO_ENGINE}")
def test_engine_builds_and_matches_torch(exported):
    edge, out, m = exported
    a = {x["export_format"]: x for x in m["artifacts"]}["tensorrt"]
    assert a["status"] == "built" and a["file"] == "edge.plan" and a["precision"] == "fp16"
    assert a["sha256"] == sha256_path(out / "edge.plan") and (out / "edge.timing.cache").stat().st_size > 0
    assert a["fidelity"]["label"] == "measured" and a["fidelity"]["min_cosine"] >= 0.999
    assert a["fidelity"]["runtime"].startswith("tensorrt ") and a["libraries"]["tensorrt"]
    art = open_artifact(out, "tensorrt")
    assert art.path.name == "edge.plan" and art.entry["profile"]["max"][0] == 32
