"""The OFA-style MobileNetV3 space at real resolution (issue 23): elastic resolution as a gene,
hard-swish and hard-sigmoid squeeze-excite, the cost model at every resolution, a supernet trained
on RGB images resized per subnet, a latency table measured at every resolution (torch runtime,
this host), and the evolutionary search under a latency budget. A tiny variant of the ``mbv3-224``
preset (narrow, two stages) on 160-px RGB images keeps it to seconds."""
from __future__ import annotations

import json
import math
import random
from dataclasses import replace

import numpy as np
import pytest
import torch

from clitest import one_line_error, run
from hetero.app.search import ARCH_FORMAT, SearchConfig, arch_preprocess, build_lut, read_arch, search
from hetero.app.training import train_edge
from hetero.checkpoint import load_checkpoint, save_checkpoint
from hetero.data import ImageSet, Preprocess
from hetero.errors import HeteroError
from hetero.models import ModelSpec
from hetero.models.complexity import count_flops, count_params
from hetero.models.embedding import create_embedding_model
from hetero.nas import latency as L
from hetero.nas.space import SPACES, Arch, SearchSpace, crossover, largest, mutate, preset, sample, smallest
from hetero.nas.supernet import arch_flops, arch_params, recalibrate_bn, resize
from hetero.nas.train import SupernetConfig, load_supernet, train_supernet
from hetero.train import TrainConfig, train_cloud

SIZE = 160
DIM = 16
PREP = Preprocess(SIZE, 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# the mbv3-224 preset, narrowed: two stages (the second with squeeze-excite and hard-swish), two
# widths, kernels 3/5, expands 3/4, depth 2 (and 2-3), resolutions 128/160
TINY = {"preset": "mbv3-224", "stem": 8, "stages": [[8, 2, 2], [16, 3, 2]], "kernels": [3, 5], "expands": [3, 4],
        "widths": [0.5, 1.0], "head": 32, "input_size": SIZE, "resolutions": [128, 160], "acts": ["relu", "hswish"],
        "stage_se": [False, True]}
FAST = dict(rounds=2, warmup=2, iters=5, budget_s=None)  # timing settings of the test's table


def rgb_images(n: int = 200, classes: int = 4, seed: int = 0) -> ImageSet:
    """Colour images whose class is a hue and a stripe orientation, with noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / SIZE
    hues = rng.uniform(40, 215, size=(classes, 3))
    imgs = np.empty((n, SIZE, SIZE, 3), np.uint8)
    for i, c in enumerate(labels):
        stripes = np.sin(2 * math.pi * 6 * (xx if c % 2 else yy) + rng.uniform(0, 6.28))[..., None]
        img = hues[c] + 30 * stripes + rng.normal(0, 20, size=(SIZE, SIZE, 3))
        imgs[i] = np.clip(img, 0, 255).astype(np.uint8)
    return ImageSet(imgs, labels, tuple(f"c{k}" for k in range(classes)), "rgb160/train")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One torch thread: on a small shared host, two threads on these tiny convolutions only contend."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data() -> ImageSet:
    return rgb_images()


@pytest.fixture(scope="module")
def cloud(data, tmp_path_factory):
    torch.manual_seed(0)
    ckpt = train_cloud(TrainConfig(model="test_mobilenet", dim=DIM, epochs=1, batch_size=50), data, PREP, progress=False)
    out = tmp_path_factory.mktemp("rr") / "cloud"
    save_checkpoint(ckpt, out)
    return out


@pytest.fixture(scope="module")
def supernet(cloud, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("rr") / "supernet"
    cfg = SupernetConfig(epochs=1, batch_size=50, val_size=100, n_random=1, space=TINY)
    train_supernet(cfg, load_checkpoint(cloud), data, out, progress=False, log=lambda s: None)
    return out


@pytest.fixture(scope="module")
def lut(supernet, tmp_path_factory):
    net, _ = load_supernet(supernet)
    path = tmp_path_factory.mktemp("rr") / "lut-torch.json"
    build_lut(net, path, "host-torch", every_block=True, **FAST)
    return path


def test_the_preset_is_ofa_mobilenetv3_and_its_cost_model_counts_every_resolution():
    sp = SearchSpace.from_dict(preset("mbv3-224"))
    assert "mbv3-224" in SPACES and sp.resolution_choices == (128, 160, 192, 224) and sp.in_channels == 3
    assert sp.stage_channels(1.0) == (16, 24, 40, 80, 112, 160) and [s[2] for s in sp.stages] == [1, 2, 2, 2, 1, 2]
    assert sp.kernels == (3, 5, 7) and sp.expands == (3, 4, 6) and sp.depth_choices(1) == (2, 3, 4) and sp.head == 960
    small = smallest(sp)
    assert small.resolution == 128 and small.depths == (1, 2, 2, 2, 2, 2) and largest(sp).resolution == 224
    flops = {}
    for res in (128, 224):
        a = replace(small, resolution=res)
        m = create_embedding_model(ModelSpec("nas_mbv3", 64, {"arch": a.to_dict(), "space": sp.to_dict()}), 3).eval()
        flops[res] = arch_flops(a, sp, 64)
        assert flops[res] == count_flops(m, (3, res, res)) and arch_params(a, sp, 64) == count_params(m)
    assert flops[224] > 2.5 * flops[128]  # (224 / 128)^2 = 3.06, less the fixed projection
    kinds = {type(m).__name__ for m in m.modules()}
    assert {"Hardswish", "Hardsigmoid", "ReLU"} <= kinds


def test_the_resolution_gene_validates_loads_old_archs_and_evolves():
    sp = SearchSpace.from_dict({k: v for k, v in TINY.items() if k != "preset"} | {
        k: v for k, v in preset("mbv3-224").items() if k in ("min_depth", "stem_act", "head_act", "se_gate")})
    d = largest(sp).to_dict()
    assert d["resolution"] == 160
    with pytest.raises(HeteroError, match=r"arch\.resolution = 150 is outside the space \(choices 128, 160\)"):
        Arch.from_dict({**d, "resolution": 150}, sp)
    del d["resolution"]  # an arch without the gene runs at the space's largest resolution
    assert Arch.from_dict(d, sp).resolution == 160
    old = SearchSpace()  # the 28-px space: its arch files have no resolution and keep their keys
    a = Arch.from_dict(largest(old).to_dict(), old)
    assert a.resolution is None and "resolution" not in a.to_dict() and "resolution" not in a.key()
    assert Arch.from_dict({**a.to_dict(), "resolution": 28}, old) == a
    with pytest.raises(HeteroError, match=r"arch\.resolution = 32 is outside the space \(choices 28\)"):
        Arch.from_dict({**a.to_dict(), "resolution": 32}, old)
    assert arch_flops(a, old, 128) == arch_flops(Arch.from_dict(a.to_dict(), old), old, 128)
    rng = random.Random(0)
    drawn = [sample(sp, rng) for _ in range(40)]
    assert {x.resolution for x in drawn} == {128, 160} and all(x.depths[0] == 2 for x in drawn)
    assert all(not any(x.se[0]) and all(x.se[1]) for x in drawn)  # squeeze-excite fixed per stage
    assert {mutate(largest(sp), sp, random.Random(s), 1.0).resolution for s in range(20)} == {128, 160}
    assert mutate(largest(sp), sp, random.Random(0), 0.0) == largest(sp)
    kids = [crossover(largest(sp), smallest(sp), sp, random.Random(s)) for s in range(20)]
    assert {k.resolution for k in kids} == {128, 160}
    assert len({largest(sp).key(), replace(largest(sp), resolution=128).key()}) == 2
    for bad, what in (({"resolutions": [128, 256]}, "space.resolutions"), ({"acts": ["gelu"] * 2}, "space.acts"),
                      ({"se_gate": "tanh"}, "space.se_gate"), ({"min_depth": 9}, "space.min_depth")):
        with pytest.raises(HeteroError, match=what):
            SearchSpace.from_dict({**sp.to_dict(), **bad})
    with pytest.raises(HeteroError, match="unknown search space 'mbv9'; the presets are mbv3-224"):
        SupernetConfig(space="mbv9")


def test_the_supernet_trains_at_sampled_resolutions_and_extracts_at_each(supernet, data):
    net, meta = load_supernet(supernet)
    assert meta["preprocess"]["size"] == SIZE and meta["space"]["resolutions"] == [128, 160]
    hist = meta["history"][0]
    assert hist["subnets_per_step"] == 3 and all(math.isfinite(v) for k, v in hist.items() if k.endswith("total"))
    x = torch.from_numpy(PREP.apply(data.images[:16]))
    rng = random.Random(3)
    for a in [smallest(net.space), largest(net.space), sample(net.space, rng), sample(net.space, rng)]:
        net.set_active(a)
        recalibrate_bn(net, [x])
        with torch.no_grad():
            ref = net(x)  # the supernet resizes the 160-px batch to the subnet's resolution
            got = net.extract(a)(resize(x, a.resolution))
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
            if a.resolution != SIZE:  # and at another resolution it computes something else
                assert (net.extract(a)(x) - ref).abs().max() > 1e-4
        assert L.arch_input_shape(a, net.space) == (3, a.resolution, a.resolution)


def test_the_latency_table_has_every_resolution_under_its_own_keys(supernet, lut):
    net, _ = load_supernet(supernet)
    table = L.load_table(lut)
    assert table["profile"] == "host-torch" and table["runtime"].startswith("torch")
    convs = {tuple(e["block"]["input"]) for e in table["entries"].values() if e["block"]["type"] == "conv_bn_hswish"}
    assert {c for c in convs if c[0] == 3} == {(3, 128, 128), (3, 160, 160)}  # the stem, at each resolution
    assert {row["model"]["resolution"] for row in table["overhead"]["calibration"]} == {128, 160}
    assert all(math.isfinite(e["trimmed_mean_ms"]) for e in table["entries"].values())
    rng = random.Random(5)
    for a in [sample(net.space, rng) for _ in range(10)]:
        blocks = L.arch_blocks(a, net.space, net.dim)
        assert not L.missing_blocks(blocks, table)
        other = L.arch_blocks(replace(a, resolution=288 - a.resolution), net.space, net.dim)
        assert not {b.key("host-torch") for b in blocks} & {b.key("host-torch") for b in other}
        assert math.isfinite(L.predict_latency(blocks, table))


def test_search_under_a_latency_budget_picks_a_subnet_and_its_resolution(supernet, cloud, lut, data, tmp_path):
    net, meta = load_supernet(supernet)
    table = L.load_table(lut)
    lo, hi = (L.predict_latency(L.arch_blocks(a, net.space, DIM), table) for a in (smallest(net.space), largest(net.space)))
    budget = lo + 0.5 * abs(hi - lo) + 1e-4
    text = f"latency={budget:.4f}ms@host-torch"
    res = search(supernet, cloud, [text], data=data, out=tmp_path / "s", progress=False, log=lambda s: None,
                 cfg=SearchConfig(population=4, generations=1, lut=str(lut), calib_images=64))
    doc = json.loads(res.arch_files[text].read_text())
    arch, space = read_arch(str(res.arch_files[text]))
    assert arch.resolution in (128, 160) and doc["arch"]["resolution"] == arch.resolution
    assert doc["cost"] <= float(f"{budget:.4f}") and doc["flops"] == arch_flops(arch, space, DIM)
    assert doc["preprocess"] == {**PREP.to_dict(), "size": arch.resolution}
    assert arch_preprocess(PREP, arch, space).size == arch.resolution
    pareto = json.loads((tmp_path / "s" / "pareto.json").read_text())
    assert pareto["evaluations"] >= 4 and {c["arch"]["resolution"] for c in pareto["candidates"]} <= {128, 160}
    for c in pareto["candidates"]:
        assert c["flops"] == arch_flops(Arch.from_dict(c["arch"], space), space, DIM)
    best = max((c for c in pareto["candidates"]
                if pareto["latency_ms"].get(f"host-torch:{Arch.from_dict(c['arch'], space).key()}", math.inf)
                <= float(f"{budget:.4f}")), key=lambda c: c["map_at_r"])
    assert doc["val_map_at_r"] == best["map_at_r"]
    with pytest.raises(HeteroError, match="--finetune-top does not yet work on a space with elastic resolution"):
        search(supernet, cloud, [text], data=data, out=tmp_path / "t", progress=False,
               cfg=SearchConfig(finetune_top=1, lut=str(lut)))


def test_bad_space_names_are_one_line_errors(cloud, tmp_path, capsys):
    code, _, err = run(capsys, "train-supernet", "--cloud", cloud, "--out", tmp_path / "sn", "--space", "mbv3-224",
                       "--data", "synthetic", "--quiet")
    one_line_error(code, err, "resolutions go up to 224 px", "gives 160 px")
    code, _, err = run(capsys, "train-supernet", "--cloud", cloud, "--out", tmp_path / "sn", "--space", "mbv9",
                       "--data", "synthetic", "--quiet")
    one_line_error(code, err, "--search-space mbv9 does not exist and is not a preset (mbv3-224)")
    assert not (tmp_path / "sn").exists()


def test_train_edge_from_an_arch_trains_and_records_the_subnet_at_its_resolution(supernet, cloud, tmp_path):
    """``train-edge --arch`` of an elastic-resolution space: the edge reads the images at the subnet's
    resolution (its checkpoint's preprocess says so), the cloud's targets stay at the cloud's size."""
    net, meta = load_supernet(supernet)
    arch = replace(smallest(net.space), resolution=128)
    path = tmp_path / "arch.json"
    path.write_text(json.dumps({"format": ARCH_FORMAT, "arch": arch.to_dict(), "space": net.space.to_dict()}))
    r = train_edge(cloud, tmp_path / "edge", data="synthetic:", arch=path, init_from=supernet, progress=False,
                   config={"epochs": 1, "batch_size": 50, "limit": 100, "losses": {"alignment": 1.0}})
    ck = load_checkpoint(r.path)
    assert ck.preprocess == replace(PREP, size=128) and ck.input_shape == (3, 128, 128)
    assert load_checkpoint(cloud).preprocess.size == SIZE and r.checkpoint.config["size"] == 128
    with torch.no_grad():
        assert ck.model(torch.zeros(2, 3, 128, 128)).shape == (2, DIM)
