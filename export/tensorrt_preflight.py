"""TensorRT pre-flight: which ONNX graphs TensorRT accepts, decided without TensorRT (pure ``onnx``,
runs anywhere).

Every node of the graph, subgraphs of ``If``/``Loop``/``Scan`` included, is checked against
onnx-tensorrt's operator support table (``export/data/onnx_tensorrt_ops.json``, transcribed from
onnx-tensorrt ``docs/operators.md``) and the table's restrictions that can be checked mechanically
(``attribute_rules``: attribute values, constant inputs, ranks, static shapes, dtypes). A graph that
fails cannot be expressed in TensorRT; :func:`preflight_message` says why in one line.

``onnx`` is an optional extra (``hetero[onnx]``): it is imported where it is used, so that importing
the exporters needs none of their libraries.
"""
from __future__ import annotations

import functools
import importlib.resources
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from hetero.errors import require

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
        from onnx import numpy_helper  # optional (hetero[onnx]), imported on use

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
    from onnx import helper, numpy_helper  # optional (hetero[onnx]), imported on use

    for a in node.attribute:
        if a.name == "value":
            return a.t
        if a.name in ("value_float", "value_floats", "value_int", "value_ints"):
            return numpy_helper.from_array(np.asarray(helper.get_attribute_value(a),
                                                      dtype=np.float32 if "float" in a.name else np.int64))
    return None


_RANDOM_OPS = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli"}


def _attrs(node) -> dict[str, Any]:
    from onnx import helper  # optional (hetero[onnx]), imported on use

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
    from onnx import TensorProto  # optional (hetero[onnx]), imported on use

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
    from onnx import AttributeProto  # optional (hetero[onnx]), imported on use

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

