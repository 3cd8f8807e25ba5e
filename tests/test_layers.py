"""The layers, checked rather than hoped for (STYLE rule 11, issue 22): the import graph read from the
source, module-level and function-level imports alike, has no cycle and no import against the layer
order (devices < hetero's learning core < export < hetero.app); the device core imports neither torch
nor hetero; inside functions, only optional heavy libraries are imported, never our own packages,
and each such import says why.
"""
from __future__ import annotations

import ast

from imports import ROOT, cycles, imports, layer, local_imports, modules, third_party, upward

# third-party libraries a function may import on use: optional extras, or heavy ones a command may never need
OPTIONAL = {"resource", "tqdm", "onnx", "onnxruntime", "onnxslim", "onnxscript", "coremltools", "tensorrt", "matplotlib", "PIL", "faiss",
            "threadpoolctl", "torchvision", "timm", "psutil", "ai_edge_litert", "litert_torch", "executorch", "tomllib"}


def test_no_import_cycle():
    assert cycles(imports(modules())) == []


def test_no_import_against_the_layer_order():
    assert upward(imports(modules())) == []


def test_every_module_has_a_layer_and_the_application_layer_is_hetero_app():
    m = modules()
    assert {layer(x) for x in m} == {"devices", "core", "export", "app"}
    assert {x for x in m if layer(x) == "app"} == {x for x in m if x.startswith("hetero.app")} | {"hetero",
                                                                                                  "hetero.__main__"}


def test_the_device_core_imports_neither_torch_nor_hetero():
    m = modules()
    assert [d for d in m if d.split(".")[0] == "devices" and "torch" in third_party(m, d)] == []


def test_no_function_local_import_of_our_own_packages():
    assert local_imports(modules()) == []


def test_function_local_imports_are_optional_libraries_and_say_why():
    """An import inside a function is of an optional heavy library, with a comment on its line (or the
    line above) saying why it is deferred."""
    bad = []
    for mod, f in modules().items():
        lines = f.read_text(encoding="utf-8").splitlines()
        for fn in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                    names = [node.module]
                else:
                    continue
                tops = {n.split(".")[0] for n in names}
                said = "#" in lines[node.lineno - 1] or lines[node.lineno - 2].strip().startswith("#")
                if not tops <= OPTIONAL or not said:
                    bad.append(f"{f.relative_to(ROOT)}:{node.lineno} {', '.join(sorted(tops))}")
    assert bad == [], "function-local imports that are not optional libraries with a reason: " + "; ".join(bad)


def test_the_graph_reader_sees_a_cycle_and_an_upward_import():
    """The checker itself, on a made-up graph: a -> b -> a is a cycle; devices importing hetero is upward."""
    graph = {"devices.x": {"hetero.y"}, "hetero.y": {"devices.x"}, "hetero.z": set()}
    assert cycles(graph) == [("devices.x", "hetero.y")]
    assert upward(graph) == [("devices.x", "hetero.y")]
