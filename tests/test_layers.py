"""The layers, checked rather than hoped for (STYLE rule 11, issue 22), as a ratchet while the redesign
is under way: the import graph read from the source may hold no cycle, upward import or torch import
in the device core beyond the ones listed here, which are today's. A new one fails; a listed one that
is gone fails too, until it is struck from its list, so the lists only shrink. The count of
function-local imports of hetero's own packages may not grow. Issue 22 is done when the lists are
empty and the count is down to the heavy optional libraries.
"""
from __future__ import annotations

from imports import cycles, imports, local_imports, modules, third_party, upward

KNOWN_CYCLES = [
    # devices/__init__ registers the torch runner, which loads checkpoints: the device core reaches all of
    # hetero's data and model code, and back through hetero._atomic -> devices.outputs
    {"devices", "devices.torch_runner", "hetero._atomic", "hetero.byo", "hetero.checkpoint", "hetero.data",
     "hetero.data._decode", "hetero.data._image_cache", "hetero.data.fashion_mnist", "hetero.data.image_folder",
     "hetero.data.imageset", "hetero.data.lazy", "hetero.data.loader", "hetero.data.synthetic",
     "hetero.distributed", "hetero.embed", "hetero.models", "hetero.models.embedding", "hetero.nas",
     "hetero.nas.supernet"},
]
KNOWN_UPWARD = [
    ("devices.torch_runner", "hetero.checkpoint"),  # inside the core pack-runner zips
    ("hetero.latency_lut", "export.onnx"),  # the predictor and its measuring side in one module
    ("hetero.nas.search", "export"),  # evolution and its orchestration in one module
]
KNOWN_TORCH_IN_DEVICES = ["devices.profiles", "devices.tensorrt_runner", "devices.torch_runner"]
KNOWN_LOCAL_IMPORTS = 122  # unique (module, imported module) pairs inside functions


def test_no_new_import_cycle():
    found = cycles(imports(modules()))
    new = [c for c in found if not any(set(c) <= k for k in KNOWN_CYCLES)]
    assert not new, f"a new or larger import cycle: {new}"
    gone = [sorted(k) for k in KNOWN_CYCLES if not any(set(c) & k for c in found)]
    assert not gone, f"fixed, strike it from KNOWN_CYCLES: {gone}"


def test_no_new_upward_import():
    assert upward(imports(modules())) == sorted(KNOWN_UPWARD), "an import against the layer order (see the module docstring of tests/support/imports.py), or one fixed: update KNOWN_UPWARD"


def test_the_device_core_does_not_grow_torch_imports():
    m = modules()
    assert sorted(d for d in m if d.split(".")[0] == "devices" and "torch" in third_party(m, d)) == \
        KNOWN_TORCH_IN_DEVICES


def test_function_local_imports_of_our_own_packages_do_not_grow():
    n = len(local_imports(modules()))
    assert n <= KNOWN_LOCAL_IMPORTS, f"{n} function-local imports of hetero/export/devices (was {KNOWN_LOCAL_IMPORTS}): import at module level, or say why not"


def test_the_graph_reader_sees_a_cycle_and_an_upward_import():
    """The checker itself, on a made-up graph: a -> b -> a is a cycle; devices importing hetero is upward."""
    graph = {"devices.x": {"hetero.y"}, "hetero.y": {"devices.x"}, "hetero.z": set()}
    assert cycles(graph) == [("devices.x", "hetero.y")]
    assert upward(graph) == [("devices.x", "hetero.y")]
