"""TensorRT: a serialised engine (``<name>.plan``) made from the ONNX, with a pre-flight check.

Three parts:

* :func:`preflight` (pure ``onnx``, runs anywhere): every node of the graph, subgraphs of
  ``If``/``Loop``/``Scan`` included, against onnx-tensorrt's operator support table
  (``export/data/onnx_tensorrt_ops.json``, transcribed from onnx-tensorrt ``docs/operators.md``) and
  the table's restrictions that can be checked mechanically (``attribute_rules``). A graph that
  fails it cannot be expressed in TensorRT: the exporter raises :class:`FormatCannotExpress`.
* Where ``tensorrt`` is not importable or no CUDA GPU is present (a CPU-only export host), the
  manifest entry is ``status: "build-on-target"``: no file, plus the exact ``trtexec`` command that
  builds the engine on the target (:func:`trtexec_command`) and the pre-flight report.
* Where ``tensorrt`` imports and a GPU is present, the plan is built here (:func:`build_engine`) and
  its fidelity measured on the GPU. That code is written against the TensorRT 10/11 documented
  Python API and is UNVERIFIED on CPU-only machines (it has only run where ``tensorrt`` is
  installed; the tests marked ``tensorrt`` exercise it).

TensorRT 10 vs 11: TensorRT 11 removed the precision builder flags (``BuilderFlag.FP16`` ...):
every network is strongly typed, so the FP16 ONNX (FP16 weights and activations, normalisation in
FP32) is built as it is. TensorRT 10 builds the FP32 ONNX with ``BuilderFlag.FP16`` (weak typing:
TensorRT picks FP16 kernels where it likes; keeping the normalisation in FP32 is not controlled).
"""
from __future__ import annotations

import functools
import importlib.resources
import json
import platform
import shlex
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from export.base import (ExportJob, FormatCannotExpress, artifact_entry, io_spec, measured_fidelity, pending_fidelity,
                         register_exporter)
from export.base import INPUT_NAME, OUTPUT_NAME
from hetero.errors import HeteroError, require

FORMAT = "tensorrt"
TABLE_FILE = "onnx_tensorrt_ops.json"
_MAX_MESSAGE_PROBLEMS = 5  # (op, reason) groups named in the one-line FormatCannotExpress message

# ----------------------------------------------------------------------------------------- table


@functools.lru_cache(maxsize=1)
def load_table() -> dict[str, Any]:
    """The onnx-tensorrt operator table (``export/data/onnx_tensorrt_ops.json``)."""
    text = importlib.resources.files("export").joinpath("data", TABLE_FILE).read_text(encoding="utf-8")
    return json.loads(text)


def _table_info(table: dict[str, Any]) -> dict[str, Any]:
    return {"source": table["source"], "release": table.get("source_release"), "commit": table.get("commit"),
            "tensorrt_version": table["tensorrt_version"], "opset_range": table.get("opset_range")}


# ------------------------------------------------------------------------------------ pre-flight

_DEFAULT_DOMAINS = ("", "ai.onnx")


class _Scope:
    """What a rule needs to know about the tensors visible in one (sub)graph: constants (initializers
    and Constant outputs), build-time constants, and the types/shapes ONNX inference found."""

    def __init__(self, parent: "_Scope | None" = None):
        self.weights: dict[str, Any] = dict(parent.weights) if parent else {}  # name -> TensorProto or None
        self.derived: set[str] = set(parent.derived) if parent else set()  # computed only from weights
        self.types: dict[str, Any] = dict(parent.types) if parent else {}  # name -> TypeProto

    def add_graph(self, graph) -> None:
        for t in graph.initializer:
            self.weights[t.name] = t
        for v in list(graph.input) + list(graph.value_info) + list(graph.output):
            if v.type.HasField("tensor_type"):
                self.types[v.name] = v.type
        for i in graph.input:  # a graph input shadows an outer constant of the same name
            if i.name not in {t.name for t in graph.initializer}:
                self.weights.pop(i.name, None)
                self.derived.discard(i.name)

    def is_weight(self, name: str) -> bool:
        return name in self.weights

    def is_constant(self, name: str) -> bool:
        return name in self.weights or name in self.derived

    def value(self, name: str) -> np.ndarray | None:
        from onnx import numpy_helper

        t = self.weights.get(name)
        if t is None:
            return None
        try:
            return numpy_helper.to_array(t)
        except Exception:  # external data or an exotic type: not resolvable here
            return None

    def elem_type(self, name: str) -> int | None:
        if name in self.weights and self.weights[name] is not None:
            return self.weights[name].data_type
        t = self.types.get(name)
        return t.tensor_type.elem_type if t is not None and t.tensor_type.elem_type else None

    def dims(self, name: str) -> list[int | None] | None:
        """Dimensions (None where symbolic or unknown), or None when the rank is unknown."""
        if name in self.weights and self.weights[name] is not None:
            return [int(d) for d in self.weights[name].dims]
        t = self.types.get(name)
        if t is None or not t.tensor_type.HasField("shape"):
            return None
        return [d.dim_value if d.HasField("dim_value") else None for d in t.tensor_type.shape.dim]


def _constant_node_value(node) -> Any:
    """The TensorProto a Constant node makes, or None for the kinds not converted here."""
    from onnx import helper, numpy_helper

    for a in node.attribute:
        if a.name == "value":
            return a.t
        if a.name in ("value_float", "value_floats", "value_int", "value_ints"):
            return numpy_helper.from_array(np.asarray(helper.get_attribute_value(a),
                                                      dtype=np.float32 if "float" in a.name else np.int64))
    return None


_RANDOM_OPS = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli"}


def _attrs(node) -> dict[str, Any]:
    from onnx import helper

    out = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        if isinstance(v, bytes):
            v = v.decode("utf-8", "replace")
        elif isinstance(v, list):
            v = [x.decode("utf-8", "replace") if isinstance(x, bytes) else x for x in v]
        out[a.name] = v
    return out


def _input(node, i: int) -> str | None:
    return node.input[i] if i < len(node.input) and node.input[i] else None


def _output(node, i: int) -> str | None:
    return node.output[i] if i < len(node.output) and node.output[i] else None


def _check_values(arr: np.ndarray, cond: Any) -> str | None:
    """Why ``arr`` fails ``cond`` ("all_zero", "all_false", {"less_than": n}), or None."""
    flat = np.asarray(arr).reshape(-1)
    if cond == "all_zero" and np.any(flat.astype(np.float64) != 0):
        return f"value {flat[:4].tolist()} is not zero"
    if cond == "all_false" and np.any(flat.astype(bool)):
        return f"value {flat[:4].tolist()} is not False"
    if isinstance(cond, dict) and "less_than" in cond and np.any(flat.astype(np.float64) >= cond["less_than"]):
        return f"value {flat[:4].tolist()} is not less than {cond['less_than']}"
    return None


def _rank_text(dims: list[int | None]) -> str:
    return "x".join("?" if d is None else str(d) for d in dims)


def _check_rule(rule: dict[str, Any], node, scope: _Scope) -> str | None:
    """Why ``node`` violates ``rule``, or None (also None where the graph does not say enough)."""
    from onnx import TensorProto

    kind = rule["kind"]
    attrs = _attrs(node)
    if kind == "attribute_in":
        v = attrs.get(rule["attribute"], rule.get("default"))
        if v is not None and v not in rule["allowed"]:
            return f"attribute {rule['attribute']}={v!r} is not one of {rule['allowed']}"
    elif kind == "attribute_absent":
        defaults = rule.get("defaults", {})
        bad = [a for a in rule["attributes"] if a in attrs and not (a in defaults and attrs[a] == defaults[a])]
        if bad:
            return f"attribute {', '.join(bad)} is set"
    elif kind == "attribute_length_in":
        v = attrs.get(rule["attribute"])
        if v is not None and len(v) not in rule["lengths"]:
            return f"attribute {rule['attribute']}={v} has {len(v)} dims, not {' or '.join(map(str, rule['lengths']))}"
    elif kind == "attribute_all_ones":
        v = attrs.get(rule["attribute"])
        if v and any(int(x) != 1 for x in v):
            return f"attribute {rule['attribute']}={v} is not all ones"
    elif kind == "attribute_pads_symmetric":
        v = attrs.get(rule["attribute"])
        if v and list(v[:len(v) // 2]) != list(v[len(v) // 2:]):
            return f"attribute {rule['attribute']}={v} differs between begin and end"
    elif kind == "input_absent":
        present = [n for i, n in zip(rule["inputs"], rule["input_names"]) if _input(node, i)]
        if present:
            return f"input {', '.join(present)} is given"
    elif kind == "output_absent":
        present = [n for i, n in zip(rule["outputs"], rule["output_names"]) if _output(node, i)]
        if present:
            return f"output {', '.join(present)} is used"
    elif kind == "input_initializer":
        name = _input(node, rule["input"])
        if name is None:
            return None
        if not scope.is_weight(name):
            return f"input {rule['input_name']} ({name!r}) is not an initializer"
        if rule.get("values") is not None:
            arr = scope.value(name)
            why = _check_values(arr, rule["values"]) if arr is not None else None
            return f"input {rule['input_name']}: {why}" if why else None
    elif kind == "input_constant":
        name = _input(node, rule["input"])
        if name is not None and not scope.is_constant(name):
            return f"input {rule['input_name']} ({name!r}) is computed at run time"
    elif kind == "input_constant_values":
        name = _input(node, rule["input"])
        arr = scope.value(name) if name is not None else None
        why = _check_values(arr, rule["values"]) if arr is not None else None
        return f"input {rule['input_name']}: {why}" if why else None
    elif kind == "input_rank_in":
        for i, n in zip(rule["inputs"], rule["input_names"]):
            name = _input(node, i)
            dims = scope.dims(name) if name else None
            if dims is not None and len(dims) not in rule["ranks"]:
                return f"input {n} has rank {len(dims)} ({_rank_text(dims)}), not {' or '.join(map(str, rule['ranks']))}"
    elif kind == "input_static_shape":
        name = _input(node, rule["input"])
        dims = scope.dims(name) if name else None
        if dims is not None and any(d is None for d in dims):
            return f"input {rule['input_name']} has dynamic shape {_rank_text(dims)}"
    elif kind == "input_dim_static":
        name = _input(node, rule["input"])
        dims = scope.dims(name) if name else None
        if dims:
            axis = int(attrs.get(rule["axis_attribute"], rule["axis_default"]))
            if -len(dims) <= axis < len(dims) and dims[axis] is None:
                return f"input {rule['input_name']} dimension {axis} is dynamic ({_rank_text(dims)})"
    elif kind == "input_last_dim_in":
        name = _input(node, rule["input"])
        dims = scope.dims(name) if name else None
        if dims and dims[-1] is not None and dims[-1] not in rule["values"]:
            return f"input {rule['input_name']} has last dimension {dims[-1]}, not {rule['values']}"
    elif kind == "input_dtype_in":
        name = _input(node, rule["input"])
        et = scope.elem_type(name) if name else None
        if et is not None:
            got = TensorProto.DataType.Name(et)
            if got not in rule["dtypes"]:
                return f"input {rule['input_name']} is {got}, not {' or '.join(rule['dtypes'])}"
    elif kind == "bidirectional_same_activations":
        acts = attrs.get("activations")
        if attrs.get("direction") == "bidirectional" and acts:
            n = rule["activations_per_direction"]
            fwd, rev = [a.lower() for a in acts[:n]], [a.lower() for a in acts[n:2 * n]]
            if rev and fwd != rev:
                return f"bidirectional with activations {acts[:n]} forward and {acts[n:2 * n]} reverse"
    elif kind == "if_branch_outputs":
        g = {a.name: a.g for a in node.attribute if a.name in ("then_branch", "else_branch")}
        if len(g) == 2:
            then_o, else_o = list(g["then_branch"].output), list(g["else_branch"].output)
            same = sorted({o.name for o in then_o} & {o.name for o in else_o})
            if same:
                return f"both branches output a tensor named {', '.join(map(repr, same))}"
            for a, b in zip(then_o, else_o):
                ra, rb = (len(x.type.tensor_type.shape.dim) if x.type.tensor_type.HasField("shape") else None for x in (a, b))
                if ra is not None and rb is not None and ra != rb:
                    return f"branch outputs {a.name!r} (rank {ra}) and {b.name!r} (rank {rb}) differ in rank"
    else:  # a rule kind this code does not know: the table is newer than the checker
        return None
    return None


def _node_label(node, index: int) -> str:
    return node.name or f"<unnamed {node.op_type} #{index}>"


def _walk(graph, scope: _Scope, where: str, visit) -> None:
    """Visit every node of ``graph`` and of its subgraphs, in order, tracking constants."""
    from onnx import AttributeProto

    scope.add_graph(graph)
    for i, node in enumerate(graph.node):
        visit(node, i, scope, where)
        if node.op_type == "Constant" and node.domain in _DEFAULT_DOMAINS and node.output:
            scope.weights[node.output[0]] = _constant_node_value(node)
        elif node.input and all(not n or scope.is_constant(n) for n in node.input) and \
                node.op_type not in _RANDOM_OPS and not any(a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS)
                                                            for a in node.attribute):
            scope.derived.update(o for o in node.output if o)
        for a in node.attribute:
            subs = [a.g] if a.type == AttributeProto.GRAPH else list(a.graphs) if a.type == AttributeProto.GRAPHS else []
            for k, sub in enumerate(subs):
                tag = a.name if len(subs) == 1 else f"{a.name}[{k}]"
                _walk(sub, _Scope(scope), f"{where}/{_node_label(node, i)}.{tag}", visit)


def preflight(model: Any, *, table: dict[str, Any] | None = None) -> dict[str, Any]:
    """Check an ONNX model (path or ``onnx.ModelProto``) against onnx-tensorrt's operator table.

    Counts the ops (subgraphs of ``If``/``Loop``/``Scan`` included) and lists every node whose op is
    not in the table or marked unsupported, and every node that violates one of the table's
    mechanically checkable restrictions (``attribute_rules``), each with the node's name, its op
    type and the reason (the restriction's text). ``ok`` is False if there is any such problem.
    Needs only ``onnx``; nothing of TensorRT.
    """
    onnx = require("onnx", "onnx")
    table = table or load_table()
    file = None
    if isinstance(model, (str, Path)):
        file = Path(model).name
        model = onnx.load(str(model))
    try:  # types and ranks for the shape rules; a graph inference cannot handle is checked without them
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:
        inferred = model
    ops = table["ops"]
    rules_by_op: dict[str, list[dict[str, Any]]] = {}
    for r in table.get("attribute_rules", []):
        rules_by_op.setdefault(r["op"], []).append(r)
    counts: Counter[str] = Counter()
    unsupported: list[dict[str, Any]] = []
    violated: list[dict[str, Any]] = []
    warnings: list[dict[str, Any]] = []

    def visit(node, index: int, scope: _Scope, where: str) -> None:
        op = node.op_type if node.domain in _DEFAULT_DOMAINS else f"{node.domain}::{node.op_type}"
        counts[op] += 1
        base = {"node": _node_label(node, index), "op": node.op_type, "graph": where}
        if node.domain not in _DEFAULT_DOMAINS:
            unsupported.append({**base, "domain": node.domain, "reason": f"custom-domain op ({node.domain}) is not in the "
                                "onnx-tensorrt table; TensorRT would need a plugin for it"})
            return
        entry = ops.get(node.op_type)
        if entry is None:
            unsupported.append({**base, "reason": "not in the onnx-tensorrt operator table"})
            return
        if not entry["supported"]:
            unsupported.append({**base, "reason": "marked unsupported (N) in the onnx-tensorrt operator table"
                                + (f": {entry['restrictions']}" if entry.get("restrictions") else "")})
            return
        for rule in rules_by_op.get(node.op_type, ()):
            why = _check_rule(rule, node, scope)
            if why:
                item = {**base, "rule": rule["id"], "restriction": rule["restriction"], "detail": why}
                (warnings if rule.get("severity") == "warning" else violated).append(item)

    _walk(inferred.graph, _Scope(), "main", visit)

    opset = next((o.version for o in model.opset_import if o.domain in _DEFAULT_DOMAINS), None)
    lo, hi = table.get("opset_range") or (None, None)
    opset_problem = None
    if opset is not None and lo is not None and not lo <= opset <= hi:
        opset_problem = {"node": None, "op": None, "graph": "main",
                         "reason": f"opset {opset} is outside the range {lo}-{hi} that TensorRT {table['tensorrt_version']} supports"}
    problems = ([opset_problem] if opset_problem else []) + \
        [{"node": u["node"], "op": u["op"], "graph": u["graph"], "reason": u["reason"]} for u in unsupported] + \
        [{"node": v["node"], "op": v["op"], "graph": v["graph"], "reason": f"{v['detail']} ({v['restriction']})"}
         for v in violated]
    used = set(counts)
    unchecked = [{"op": n["op"], "what": n["what"], "restriction": n["restriction"]}
                 for n in table.get("not_encoded", []) if n["op"] in used]
    return {
        "format": FORMAT,
        "file": file,
        "ok": not problems,
        "table": _table_info(table),
        "opset": opset,
        "nodes": int(sum(counts.values())),
        "op_counts": dict(sorted(counts.items())),
        "unsupported_ops": unsupported,
        "violated_rules": violated,
        "warnings": warnings,
        "problems": problems,
        "unchecked_restrictions": unchecked,
    }


def preflight_message(report: dict[str, Any], fmt: str = FORMAT) -> str:
    """One line naming the ops, nodes and the format of a failed pre-flight (nodes with the same op
    and reason grouped)."""
    groups: dict[tuple[Any, str], list[str]] = {}
    for p in report["problems"]:
        reason = " ".join(str(p["reason"]).split())[:240]
        node = p["node"] if p.get("graph", "main") == "main" else f"{p['node']} in {p['graph']}"
        groups.setdefault((p["op"], reason), []).append(node)
    parts = []
    for (op, reason), nodes in list(groups.items())[:_MAX_MESSAGE_PROBLEMS]:
        if op is None:
            parts.append(f"the model: {reason}")
            continue
        more = f" and {len(nodes) - 3} more" if len(nodes) > 3 else ""
        label = "node" if len(nodes) == 1 else "nodes"
        parts.append(f"op '{op}' ({label} {', '.join(map(str, nodes[:3]))}{more}): {reason}")
    rest = len(groups) - _MAX_MESSAGE_PROBLEMS
    tail = f"; and {rest} more problem{'s' if rest > 1 else ''}" if rest > 0 else ""
    src = f"{report['file']}; " if report.get("file") else ""
    return f"{fmt} cannot express " + "; ".join(parts) + tail + \
        f" ({src}onnx-tensorrt operator table of TensorRT {report['table']['tensorrt_version']})"


def preflight_summary(report: dict[str, Any]) -> dict[str, Any]:
    return {"ok": report["ok"], "file": report["file"], "op_counts": report["op_counts"],
            "problems": report["problems"], "warnings": report["warnings"],
            "unchecked_restrictions": report["unchecked_restrictions"], "table": report["table"]}


# ------------------------------------------------------------------------------------- trtexec


def profile_shapes(batch_sizes: tuple[int, ...] | list[int], chw: tuple[int, ...]) -> dict[str, list[int]]:
    """The optimisation profile of the batch axis: min, opt (the middle of the sizes), max."""
    sizes = sorted({int(b) for b in batch_sizes})
    if not sizes or sizes[0] < 1:
        raise HeteroError(f"TensorRT batch sizes must be positive integers, got {list(batch_sizes)}")
    return {"min": [sizes[0], *chw], "opt": [sizes[len(sizes) // 2], *chw], "max": [sizes[-1], *chw]}


def trtexec_command(onnx_file: str, *, input_name: str, profile: dict[str, list[int]], plan_file: str,
                    timing_cache_file: str, strongly_typed: bool = True, fp16: bool = False) -> str:
    """The ``trtexec`` line that builds ``plan_file`` from ``onnx_file`` with ``profile`` on the target.

    ``strongly_typed``: TensorRT 10's ``--stronglyTyped`` (11 always builds strongly typed and keeps
    the flag as a no-op): precisions come from the ONNX (an FP16 ONNX stays FP16). ``fp16``: TensorRT
    10's ``--fp16`` (weak typing; removed in 11) for an FP32 ONNX.
    """
    if strongly_typed and fp16:
        raise HeteroError("trtexec: --stronglyTyped and --fp16 exclude each other")

    def shape(key: str) -> str:
        return f"{input_name}:" + "x".join(str(int(d)) for d in profile[key])

    args = ["trtexec", f"--onnx={onnx_file}"]
    args += ["--stronglyTyped"] if strongly_typed else []
    args += ["--fp16"] if fp16 else []
    args += [f"--minShapes={shape('min')}", f"--optShapes={shape('opt')}", f"--maxShapes={shape('max')}",
             f"--saveEngine={plan_file}", f"--timingCacheFile={timing_cache_file}"]
    return " ".join(shlex.quote(a) for a in args)


# ------------------------------------------------------------------------------- host detection


def _tensorrt_here() -> tuple[Any | None, str | None]:
    """(the tensorrt module, None) where an engine can be built here, else (None, why not)."""
    try:
        import tensorrt as trt  # noqa: PLC0415
        version = str(trt.__version__)
    except Exception as e:  # not installed, or PyPI's placeholder package that fails on import
        return None, f"tensorrt is not installed here: {e.__class__.__name__}: {str(e).strip()[:120] or 'import failed'}"
    import torch

    if not torch.cuda.is_available():
        return None, f"no CUDA GPU here (tensorrt {version} is installed)"
    return trt, None


# ------------------------------------------------------------------------ engine build (GPU host)
# Written against the TensorRT 10/11 documented Python API (Builder, OnnxParser, BuilderConfig,
# optimisation profiles, timing cache, Runtime, IExecutionContext with the tensor-address API).
# UNVERIFIED on CPU-only machines: it only runs where tensorrt imports and a CUDA GPU is present.


def _trt_major(trt) -> int:
    try:
        return int(str(trt.__version__).split(".")[0])
    except ValueError:
        raise HeteroError(f"cannot read the TensorRT version {trt.__version__!r}; report it") from None


def _parser_errors(parser) -> str:
    """The parser's errors, one line: node name and op where the parser reports them."""
    out = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        node = op = None
        try:  # node_name()/node_operator() exist since TensorRT 10
            node, op = e.node_name(), e.node_operator()
        except AttributeError:
            pass
        where = f"op '{op}' (node {node}): " if node or op else (f"node #{e.node()}: " if e.node() >= 0 else "")
        out.append(where + " ".join(str(e.desc()).split())[:200])
    return "; ".join(out) or "no error reported"


def build_engine(trt, fp16_onnx: Path, fp32_onnx: Path, plan_path: Path, cache_path: Path,
                 profile: dict[str, list[int]]) -> dict[str, Any]:
    """Build and write the serialised engine and the timing cache. TensorRT >= 11: strongly typed
    network from the FP16 ONNX, no precision flags (they were removed). TensorRT 10: the FP32 ONNX
    with ``BuilderFlag.FP16``. Returns how it was built. UNVERIFIED on CPU-only machines."""
    major = _trt_major(trt)
    if major < 10:
        raise HeteroError(f"TensorRT {trt.__version__} is older than 10; install tensorrt>=10 (pip install 'hetero[tensorrt]')")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    if major >= 11:
        src, how = fp16_onnx, "strongly typed network from the FP16 ONNX (TensorRT 11: no precision flags)"
        flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)  # deprecated and ignored in 11
        network = builder.create_network(1 << int(flag) if flag is not None else 0)
    else:
        src = fp32_onnx
        how = ("FP32 ONNX with BuilderFlag.FP16 (TensorRT 10 weak typing: TensorRT chooses FP16 kernels per layer; "
               "keeping the normalisation in FP32 is not controlled)")
        network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(src)):
        raise HeteroError(f"TensorRT {trt.__version__}'s ONNX parser rejected {src.name}: {_parser_errors(parser)}")
    config = builder.create_builder_config()
    if major == 10:
        config.set_flag(trt.BuilderFlag.FP16)
    prof = builder.create_optimization_profile()
    prof.set_shape(INPUT_NAME, tuple(profile["min"]), tuple(profile["opt"]), tuple(profile["max"]))
    config.add_optimization_profile(prof)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.exists() else b"")
    config.set_timing_cache(cache, False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise HeteroError(f"TensorRT {trt.__version__} could not build an engine from {src.name} "
                          "(build_serialized_network returned None; rerun with a verbose trtexec to see why)")
    plan_path.write_bytes(bytes(memoryview(plan)))
    cache_path.write_bytes(bytes(memoryview(config.get_timing_cache().serialize())))
    return {"built_from": src.name, "network": how, "strongly_typed": major >= 11}


def run_engine(trt, plan_path: Path, inputs: np.ndarray, max_batch: int) -> np.ndarray:
    """Embed ``inputs`` with the plan on the GPU, in chunks of at most ``max_batch``, through the
    tensor-address API (set_input_shape / set_tensor_address / execute_async_v3) with torch CUDA
    tensors as buffers. UNVERIFIED on CPU-only machines."""
    import torch

    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan_path.read_bytes())
    if engine is None:
        raise HeteroError(f"TensorRT could not deserialise {plan_path.name}; rebuild it on this GPU")
    names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
    if names != {INPUT_NAME, OUTPUT_NAME}:
        raise HeteroError(f"the engine's I/O tensors are {sorted(names)}, expected {INPUT_NAME!r} and {OUTPUT_NAME!r}; report the model")
    for n in (INPUT_NAME, OUTPUT_NAME):
        if engine.get_tensor_dtype(n) != trt.float32:
            raise HeteroError(f"the engine's {n!r} is {engine.get_tensor_dtype(n)}, not float32; report the model")
    context = engine.create_execution_context()
    stream = torch.cuda.Stream()
    out = []
    with torch.cuda.stream(stream):
        for i in range(0, len(inputs), max_batch):
            x = torch.from_numpy(np.ascontiguousarray(inputs[i:i + max_batch], dtype=np.float32)).cuda()
            if not context.set_input_shape(INPUT_NAME, tuple(x.shape)):
                raise HeteroError(f"the engine refuses input shape {tuple(x.shape)}; outside its optimisation profile")
            y = torch.empty(tuple(context.get_tensor_shape(OUTPUT_NAME)), dtype=torch.float32, device="cuda")
            context.set_tensor_address(INPUT_NAME, x.data_ptr())
            context.set_tensor_address(OUTPUT_NAME, y.data_ptr())
            if not context.execute_async_v3(stream.cuda_stream):
                raise HeteroError("TensorRT execute_async_v3 failed on the check inputs")
            stream.synchronize()
            out.append(y.cpu().numpy())
    return np.concatenate(out)


# ------------------------------------------------------------------------------------- exporter


def _libraries(trt=None) -> dict[str, str | None]:
    import onnx
    import torch

    return {"torch": torch.__version__, "onnx": onnx.__version__, "tensorrt": str(trt.__version__) if trt else None}


@register_exporter("tensorrt", "TensorRT engine (.plan), FP16, batch profile; pre-flight against onnx-tensorrt's "
                   "operator table; built on the target where this host has no tensorrt or GPU", "onnx-fp16",
                   ("onnx",), "tensorrt")
def _export_tensorrt(job: ExportJob, source: Path | None) -> dict[str, Any]:
    fp16_onnx = Path(source)
    fp32_onnx = job.built.get("onnx") or job.out_dir / f"{job.name}.onnx"
    report = preflight(fp16_onnx)
    if fp32_onnx.exists():  # TensorRT 10 builds from it: same ops but the casts, checked as well
        report["fp32_onnx"] = {k: v for k, v in preflight(fp32_onnx).items() if k in ("file", "ok", "problems", "op_counts")}
    pre_file = job.out_dir / f"{job.name}.tensorrt-preflight.json"
    pre_file.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    if not report["ok"] or not report.get("fp32_onnx", {"ok": True})["ok"]:
        bad = report if not report["ok"] else {**report, **report["fp32_onnx"]}
        raise FormatCannotExpress(preflight_message(bad))

    profile = profile_shapes(job.batch_sizes, tuple(job.ckpt.input_shape))
    plan, cache = f"{job.name}.plan", f"{job.name}.timing.cache"
    common = {
        "build_command": trtexec_command(fp16_onnx.name, input_name=INPUT_NAME, profile=profile, plan_file=plan,
                                         timing_cache_file=cache),
        "build_command_tensorrt10_fp32_onnx": trtexec_command(fp32_onnx.name, input_name=INPUT_NAME, profile=profile,
                                                              plan_file=plan, timing_cache_file=cache,
                                                              strongly_typed=False, fp16=True),
        "profile": profile,
        "preflight_file": pre_file.name,
        "preflight": preflight_summary(report),
    }
    trt, why = _tensorrt_here()
    if trt is None:
        inp, out = io_spec(job)
        return {
            "format": FORMAT,
            "precision": "fp16",
            "status": "build-on-target",
            "file": None,
            "made_from": fp16_onnx.name,
            "sha256": None,
            "bytes": None,
            "weight_bytes": None,
            "input": inp,
            "output": out,
            "runtime": "tensorrt (on the target)",
            "libraries": {"python": platform.python_version(), **_libraries()},
            "note": f"engine not built here: build on target ({why}; a TensorRT plan is specific to the GPU "
                    "and the TensorRT version that built it)",
            **common,
            "fidelity": pending_fidelity("engine not built here; build it on the target, then run hetero verify there"),
        }

    # GPU host with tensorrt: build and measure (UNVERIFIED on CPU-only machines; see build_engine)
    import torch

    plan_path, cache_path = job.out_dir / plan, job.out_dir / cache
    try:
        how = build_engine(trt, fp16_onnx, fp32_onnx, plan_path, cache_path, profile)
        got = run_engine(trt, plan_path, job.check_inputs, profile["max"][0])
    except HeteroError:
        raise
    except Exception as e:  # TensorRT raises RuntimeError/TypeError with multi-line text: one line for the user
        first = (str(e).strip().splitlines() or [e.__class__.__name__])[0][:300]
        raise HeteroError(f"TensorRT {trt.__version__} failed to build or run the engine: {first}") from None
    if not np.isfinite(got).all():
        raise HeteroError("the TensorRT engine gives NaN/Inf embeddings on the check inputs; do not ship it, "
                          "and report the model")
    runtime = f"tensorrt {trt.__version__} on {torch.cuda.get_device_name()}"
    return artifact_entry(job, plan_path, fmt=FORMAT, precision="fp16", made_from=how["built_from"], runtime=runtime,
                          libraries=_libraries(trt), fidelity=measured_fidelity(job, got, runtime), weight_bytes=None,
                          timing_cache=cache, network=how["network"], gpu=torch.cuda.get_device_name(), **common)
