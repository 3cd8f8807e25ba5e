"""What an artifact file is, read from the file itself: its format and the precision of its weights.

A manifest is only a claim: someone who edits ``manifest.json`` can relabel an FP16 model as INT8
(and so loosen its gates), or point an entry at another artifact. :func:`inspect_artifact` answers
from the bytes, with a scan of the container's headers (no runtime, no model load, standard library
only, so this stays in the torch-free core):

- ONNX (protobuf): the initializers' data types and the graph's op types (QuantizeLinear /
  DequantizeLinear, QLinear*, *Integer: INT8); the graph input's dimensions;
- ORT Mobile (``.ort``, a flatbuffer with the identifier ``ORTM``): the same, from its tables;
- Core ML ML Program (``.mlpackage``): the weight ops of the program spec (``constexpr_lut_to_dense``:
  palettised with the look-up table's bits, ``constexpr_affine_dequantize``: INT8 weights) and the data
  type of its constant tensors (FLOAT16: FP16).

Anything else (a TensorRT plan, a file this scan cannot parse) gets ``precision=None``: not inspectable
here, and the caller says so instead of guessing. A damaged file is left to its runtime to refuse.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

# ONNX TensorProto.DataType (the ORT flatbuffer's TensorDataType uses the same numbers)
_ONNX_FLOAT16, _ONNX_BFLOAT16, _ONNX_INT8, _ONNX_INT4, _ONNX_UINT4 = 10, 16, 3, 22, 21
# op types that only a quantised (INT8) graph holds
_QUANT_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger",
                        "QLinearConv", "QLinearMatMul", "QGemm", "QAttention", "DynamicQuantizeMatMul",
                        "MatMulIntegerToFloat", "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool",
                        "QLinearAveragePool", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearConcat",
                        "QLinearSoftmax", "QLinearReduceMean", "MatMulNBits"})

# Core ML MIL DataType
_MIL_FLOAT16, _MIL_BFLOAT16, _MIL_INT8, _MIL_INT4, _MIL_UINT8 = 10, 13, 21, 25, 31
_MIL_SUBBYTE_BITS = {37: 1, 36: 2, 39: 3, 35: 4, 38: 6}  # UINT1, UINT2, UINT3, UINT4, UINT6


@dataclass(frozen=True)
class Inspection:
    """What a file turned out to be. ``precision`` uses the manifest's names (fp32, fp16, int8,
    int8-weights, palette4, ...); None when it could not be read here (``evidence`` says why)."""

    format: str | None  # "onnx", "ort", "coreml"; None: not recognised
    precision: str | None
    evidence: str
    input_dims: tuple[int | str, ...] | None = None  # the graph input's dims (ONNX only; str: symbolic)


class _Bad(Exception):
    """The bytes are not what the scan expected: a damaged or foreign file."""


# ------------------------------------------------------------------------------------ protobuf wire

def _fields(buf: memoryview, start: int = 0, end: int | None = None):
    """(field number, wire type, value) of one protobuf message; a length-delimited value is the
    (start, end) of its bytes, skipped without copying."""
    end = len(buf) if end is None else end
    i = start
    while i < end:
        key, i = _varint(buf, i, end)
        num, wt = key >> 3, key & 7
        if wt == 0:
            val, i = _varint(buf, i, end)
        elif wt == 1:
            val, i = None, i + 8
        elif wt == 2:
            n, i = _varint(buf, i, end)
            val, i = (i, i + n), i + n
        elif wt == 5:
            val, i = None, i + 4
        else:
            raise _Bad(f"wire type {wt}")
        if i > end or num == 0:
            raise _Bad("truncated")
        yield num, wt, val


def _varint(buf: memoryview, i: int, end: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if i >= end or shift > 63:
            raise _Bad("truncated varint")
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7


def _text(buf: memoryview, span) -> str:
    return bytes(buf[span[0]:span[1]]).decode("utf-8", "replace")


# ------------------------------------------------------------------------------------------- ONNX

def _onnx_tensor_type(buf, span) -> int | None:
    for num, wt, val in _fields(buf, *span):
        if num == 2 and wt == 0:  # TensorProto.data_type
            return val
    return None


def _onnx_graph(buf: memoryview, span, ops: set[str], dtypes: list[int], dims: list) -> None:
    for num, wt, val in _fields(buf, *span):
        if wt != 2:
            continue
        if num == 1:  # NodeProto
            for n2, w2, v2 in _fields(buf, *val):
                if n2 == 4 and w2 == 2:  # op_type
                    ops.add(_text(buf, v2))
                elif n2 == 5 and w2 == 2:  # AttributeProto: a Constant's tensor (t = 5)
                    for n3, w3, v3 in _fields(buf, *v2):
                        if n3 == 5 and w3 == 2:
                            t = _onnx_tensor_type(buf, v3)
                            if t is not None:
                                dtypes.append(t)
        elif num == 5:  # initializer
            t = _onnx_tensor_type(buf, val)
            if t is not None:
                dtypes.append(t)
        elif num == 15:  # sparse_initializer: values (1) is a TensorProto
            for n2, w2, v2 in _fields(buf, *val):
                if n2 == 1 and w2 == 2:
                    t = _onnx_tensor_type(buf, v2)
                    if t is not None:
                        dtypes.append(t)
        elif num == 11 and not dims:  # the first graph input: ValueInfoProto.type.tensor_type.shape.dim
            dims.append(_onnx_input_dims(buf, val))


def _onnx_input_dims(buf, span) -> tuple[int | str, ...] | None:
    for num, wt, val in _fields(buf, *span):
        if num == 2 and wt == 2:  # TypeProto
            for n2, w2, v2 in _fields(buf, *val):
                if n2 == 1 and w2 == 2:  # tensor_type
                    for n3, w3, v3 in _fields(buf, *v2):
                        if n3 == 2 and w3 == 2:  # shape
                            out: list[int | str] = []
                            for n4, w4, v4 in _fields(buf, *v3):
                                if n4 == 1 and w4 == 2:  # dim: dim_value (1) or dim_param (2)
                                    d: int | str = "?"
                                    for n5, w5, v5 in _fields(buf, *v4):
                                        d = v5 if (n5 == 1 and w5 == 0) else _text(buf, v5) if (n5 == 2 and w5 == 2) else d
                                    out.append(d)
                            return tuple(out)
    return None


def _graph_precision(ops: set[str], dtypes: list[int]) -> tuple[str, str]:
    quant = sorted(ops & _QUANT_OPS)
    if quant:
        return "int8", f"quantised ops ({', '.join(quant[:3])})"
    if any(t in (_ONNX_INT8, _ONNX_INT4, _ONNX_UINT4) for t in dtypes):
        return "int8", "integer weight tensors"
    if any(t == _ONNX_FLOAT16 for t in dtypes):
        return "fp16", "float16 weight tensors"
    if any(t == _ONNX_BFLOAT16 for t in dtypes):
        return "bf16", "bfloat16 weight tensors"
    return "fp32", "float32 weight tensors only"


def inspect_onnx(data: bytes) -> Inspection:
    buf = memoryview(data)
    ops: set[str] = set()
    dtypes: list[int] = []
    dims: list = []
    graphs = 0
    for num, wt, val in _fields(buf):
        if num == 7 and wt == 2:  # ModelProto.graph
            graphs += 1
            _onnx_graph(buf, val, ops, dtypes, dims)
    if graphs != 1 or not ops:
        raise _Bad("no ONNX graph")
    precision, why = _graph_precision(ops, dtypes)
    return Inspection("onnx", precision, why, dims[0] if dims else None)


# ------------------------------------------------------------------------------ ORT (flatbuffer)

class _Flat:
    """Just enough of the flatbuffers wire format to walk ORT's tables (offsets checked)."""

    def __init__(self, data: bytes):
        self.b = data

    def _u32(self, at: int) -> int:
        if at < 0 or at + 4 > len(self.b):
            raise _Bad("offset out of range")
        return struct.unpack_from("<I", self.b, at)[0]

    def _field(self, table: int, index: int) -> int | None:
        """Absolute position of field ``index`` of the table at ``table``, or None if absent."""
        vtable = table - struct.unpack_from("<i", self.b, table)[0] if 0 <= table + 4 <= len(self.b) else -1
        if vtable < 0 or vtable + 4 > len(self.b):
            raise _Bad("bad vtable")
        vsize = struct.unpack_from("<H", self.b, vtable)[0]
        slot = 4 + 2 * index
        if slot + 2 > vsize:
            return None
        off = struct.unpack_from("<H", self.b, vtable + slot)[0]
        return table + off if off else None

    def table(self, table: int, index: int) -> int | None:
        at = self._field(table, index)
        return None if at is None else at + self._u32(at)

    def vector(self, table: int, index: int) -> list[int]:
        """Positions of a vector of tables."""
        at = self._field(table, index)
        if at is None:
            return []
        vec = at + self._u32(at)
        n = self._u32(vec)
        if n > len(self.b) // 4:
            raise _Bad("vector too long")
        return [vec + 4 + 4 * i + self._u32(vec + 4 + 4 * i) for i in range(n)]

    def string(self, table: int, index: int) -> str | None:
        at = self.table(table, index)
        if at is None:
            return None
        n = self._u32(at)
        if at + 4 + n > len(self.b):
            raise _Bad("string out of range")
        return self.b[at + 4:at + 4 + n].decode("utf-8", "replace")

    def int32(self, table: int, index: int) -> int:
        at = self._field(table, index)
        if at is None:
            return 0
        if at + 4 > len(self.b):
            raise _Bad("scalar out of range")
        return struct.unpack_from("<i", self.b, at)[0]


def inspect_ort(data: bytes) -> Inspection:
    # schema (onnxruntime/core/flatbuffers/schema/ort.fbs): InferenceSession.model = 1; Model.graph = 7;
    # Graph.initializers = 0, nodes = 2, sparse_initializers = 7; Tensor.data_type = 3; Node.op_type = 5;
    # SparseTensor.values = 0
    f = _Flat(data)
    if len(data) < 8 or data[4:8] != b"ORTM":
        raise _Bad("no ORTM identifier")
    session = f._u32(0)
    model = f.table(session, 1)
    graph = f.table(model, 7) if model is not None else None
    if graph is None:
        raise _Bad("no graph")
    dtypes = [f.int32(t, 3) for t in f.vector(graph, 0)]
    for sparse in f.vector(graph, 7):
        values = f.table(sparse, 0)
        if values is not None:
            dtypes.append(f.int32(values, 3))
    ops = {s for s in (f.string(n, 5) for n in f.vector(graph, 2)) if s}
    if not ops:
        raise _Bad("no nodes")
    precision, why = _graph_precision(ops, dtypes)
    return Inspection("ort", precision, why)


# -------------------------------------------------------------------------------- Core ML package

def _mil_tensor(buf, span) -> tuple[int, tuple[int, ...]] | None:
    """(dataType, constant dims) of a MIL Value's tensor type."""
    for num, wt, val in _fields(buf, *span):
        if num == 2 and wt == 2:  # Value.type (ValueType)
            for n2, w2, v2 in _fields(buf, *val):
                if n2 == 1 and w2 == 2:  # tensorType
                    dtype, dims = 0, []
                    for n3, w3, v3 in _fields(buf, *v2):
                        if n3 == 1 and w3 == 0:
                            dtype = v3
                        elif n3 == 3 and w3 == 2:  # Dimension.constant.size
                            size = -1
                            for n4, w4, v4 in _fields(buf, *v3):
                                if n4 == 1 and w4 == 2:
                                    for n5, w5, v5 in _fields(buf, *v4):
                                        if n5 == 1 and w5 == 0:
                                            size = v5
                            dims.append(size)
                    return dtype, tuple(dims)
    return None


def _mil_block(buf, span, ops: list[tuple[str, dict[str, tuple[int, tuple[int, ...]]]]], depth: int = 0) -> None:
    if depth > 16:
        raise _Bad("blocks nested too deep")
    for num, wt, val in _fields(buf, *span):
        if num != 3 or wt != 2:  # Block.operations
            continue
        kind, attrs = "", {}
        for n2, w2, v2 in _fields(buf, *val):
            if n2 == 1 and w2 == 2:
                kind = _text(buf, v2)
            elif n2 == 4 and w2 == 2:  # nested blocks (cond, while)
                _mil_block(buf, v2, ops, depth + 1)
            elif n2 == 5 and w2 == 2:  # attributes: map entry, key (1) -> Value (2)
                name, tensor = "", None
                for n3, w3, v3 in _fields(buf, *v2):
                    if n3 == 1 and w3 == 2:
                        name = _text(buf, v3)
                    elif n3 == 2 and w3 == 2:
                        tensor = _mil_tensor(buf, v3)
                if tensor is not None:
                    attrs[name] = tensor
        ops.append((kind, attrs))


def _map_values(buf, span, field: int):
    """The values (field 2) of the map entries in ``field`` of a message."""
    for num, wt, val in _fields(buf, *span):
        if num == field and wt == 2:
            for n2, w2, v2 in _fields(buf, *val):
                if n2 == 2 and w2 == 2:
                    yield v2


def _coreml_spec_path(package: Path) -> Path:
    try:
        man = json.loads((package / "Manifest.json").read_text(encoding="utf-8"))
        root = man["itemInfoEntries"][man["rootModelIdentifier"]]["path"]
        path = package / "Data" / root
    except (OSError, ValueError, KeyError, TypeError):
        raise _Bad("no readable Manifest.json") from None
    if not path.is_file():
        raise _Bad("no model spec")
    return path


def inspect_coreml(package: Path) -> Inspection:
    data = _coreml_spec_path(package).read_bytes()
    buf = memoryview(data)
    ops: list[tuple[str, dict[str, tuple[int, tuple[int, ...]]]]] = []
    program = None
    for num, wt, val in _fields(buf):
        if num == 502 and wt == 2:  # Model.mlProgram
            program = val
    if program is None:
        return Inspection("coreml", None, "not an ML Program (a neural network package): its precision cannot be read here")
    for function in _map_values(buf, program, 2):  # Program.functions
        for block in _map_values(buf, function, 3):  # Function.block_specializations
            _mil_block(buf, block, ops)
    if not ops:
        raise _Bad("no operations")
    kinds = {k for k, _ in ops}
    if "constexpr_lut_to_dense" in kinds:
        bits = set()
        for kind, attrs in ops:
            if kind != "constexpr_lut_to_dense":
                continue
            idx, lut = attrs.get("indices"), attrs.get("lut")
            if idx and idx[0] in _MIL_SUBBYTE_BITS:  # iOS 18: the indices' own sub-byte type
                bits.add(_MIL_SUBBYTE_BITS[idx[0]])
            elif lut and lut[1]:  # iOS 16: [2^bits]; iOS 18: [..., 2^bits, vector size]
                n = lut[1][0] if len(lut[1]) == 1 else lut[1][-2]
                bits.add(int(math.log2(n)) if n > 0 and n & (n - 1) == 0 else -1)
        if len(bits) == 1 and min(bits) > 0:
            b = bits.pop()
            return Inspection("coreml", f"palette{b}", f"palettised weights ({2 ** b}-entry look-up tables)")
        return Inspection("coreml", f"palette{'/'.join(map(str, sorted(bits)))}", "palettised weights of mixed bits")
    quantised = kinds & {"constexpr_affine_dequantize", "constexpr_blockwise_shift_scale"}
    types = {t[0] for _, attrs in ops for t in attrs.values()}
    if quantised or types & {_MIL_INT8, _MIL_UINT8}:
        if _MIL_INT4 in types:
            return Inspection("coreml", "int4-weights", "4-bit quantised weights")
        return Inspection("coreml", "int8-weights", f"8-bit quantised weights ({', '.join(sorted(quantised)) or 'int8 constants'})")
    weights = {t[0] for kind, attrs in ops if kind == "const" for t in attrs.values()}
    if _MIL_FLOAT16 in weights:
        return Inspection("coreml", "fp16", "float16 constants")
    if _MIL_BFLOAT16 in weights:
        return Inspection("coreml", "bf16", "bfloat16 constants")
    return Inspection("coreml", "fp32", "float32 constants only")


# ------------------------------------------------------------------------------------------ driver

def inspect_artifact(path: str | Path) -> Inspection:
    """The format and weight precision of an artifact file (or ``.mlpackage`` directory)."""
    path = Path(path)
    try:
        if path.is_dir():
            if (path / "Manifest.json").is_file():
                return inspect_coreml(path)
            return Inspection(None, None, "a directory that is no Core ML package")
        with open(path, "rb") as f:
            head = f.read(8)
        if head[4:8] == b"ORTM":
            return inspect_ort(path.read_bytes())
        if path.suffix in (".plan", ".engine", ".trt"):
            return Inspection(None, None, "a TensorRT engine: its precision cannot be read without TensorRT")
        return inspect_onnx(path.read_bytes())
    except (_Bad, OSError, struct.error, RecursionError, ValueError, UnicodeDecodeError):
        return Inspection(None, None, "not readable as ONNX, ORT or Core ML here (its runtime will say what is wrong)")
