import json
import random
from dataclasses import replace

import pytest
import torch

from hetero.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from hetero.data import FASHION_MNIST_PREPROCESS
from hetero.errors import HeteroError
from hetero.models import ModelSpec, create_backbone
from hetero.models.complexity import count_flops, count_params
from hetero.nas import Arch, SearchSpace, Supernet, arch_flops, arch_params, crossover, largest, mutate, recalibrate_bn
from hetero.nas import sample, smallest

DIM = 16
SPACE = SearchSpace()
# a small space for the numeric tests: every elastic dimension present, a few ms per forward
TINY = SearchSpace(stem=8, stages=((8, 1, 1), (12, 2, 2), (16, 2, 2)), kernels=(3, 5, 7), expands=(2, 3),
                   widths=(0.5, 1.0))


def archs(space: SearchSpace, n: int = 4) -> list[Arch]:
    rng = random.Random(0)
    return [largest(space), smallest(space)] + [sample(space, rng) for _ in range(n)]


def make_net(space: SearchSpace = TINY, seed: int = 0) -> Supernet:
    """A supernet whose BN statistics and affine parameters are not the identity."""
    torch.manual_seed(seed)
    net = Supernet(space, DIM)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def images(n: int = 8, seed: int = 1, space: SearchSpace = TINY) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, space.in_channels, space.input_size, space.input_size, generator=g)


@pytest.mark.parametrize("mutation, message", [
    (lambda d: d["depths"].__setitem__(2, 5), r"arch\.depths\[2\] = 5 is outside the space \(choices 1, 2, 3\)"),
    (lambda d: d["kernels"][1].__setitem__(0, 4), r"arch\.kernels\[1\]\[0\] = 4 is outside the space \(choices 3, 5, 7\)"),
    (lambda d: d["expands"][3].__setitem__(2, 5), r"arch\.expands\[3\]\[2\] = 5 is outside"),
    (lambda d: d["se"][0].__setitem__(0, 1), r"arch\.se\[0\]\[0\] = 1 is outside the space \(choices false, true\)"),
    (lambda d: d.__setitem__("width", 0.6), r"arch\.width = 0\.6 is outside the space \(choices 0\.5, 0\.75, 1\.0\)"),
    (lambda d: d["kernels"].pop(), r"arch\.kernels must be a list of 4"),
    (lambda d: d["kernels"][2].pop(), r"arch\.kernels\[2\] must be a list of 3"),
    (lambda d: d.pop("se"), r"arch is missing se"),
    (lambda d: d.__setitem__("colour", "red"), r"arch has unknown key\(s\) colour"),
])
def test_validator_names_the_wrong_field(mutation, message):
    d = largest(SPACE).to_dict()
    mutation(d)
    with pytest.raises(HeteroError, match=message) as e:
        Arch.from_dict(d, SPACE)
    assert "\n" not in str(e.value)


def test_space_and_arch_round_trip_through_json():
    assert SearchSpace.from_dict(json.loads(json.dumps(SPACE.to_dict()))) == SPACE
    for a in archs(SPACE):
        assert Arch.from_dict(json.loads(json.dumps(a.to_dict())), SPACE) == a
    with pytest.raises(HeteroError, match="space has unknown key"):
        SearchSpace.from_dict({**SPACE.to_dict(), "depth": 3})
    with pytest.raises(HeteroError, match=r"space\.stages\[0\]"):
        SearchSpace.from_dict({**SPACE.to_dict(), "stages": [[16, 1, 3]]})
    with pytest.raises(HeteroError, match="JSON object"):
        SearchSpace.from_dict(None)


def test_key_ignores_inactive_slots():
    a = smallest(SPACE)
    k = [list(r) for r in a.kernels]
    k[1][2] = 7  # slot 2 of stage 1 is inactive at depth 1
    b = replace(a, kernels=tuple(tuple(r) for r in k))
    assert a != b and a.key() == b.key()
    assert a.key() != largest(SPACE).key()


def test_sample_mutate_crossover_stay_in_space_and_are_seeded():
    def run(seed):
        rng = random.Random(seed)
        out = [sample(SPACE, rng) for _ in range(20)]
        out += [mutate(a, SPACE, rng, 0.3) for a in out[:10]]
        out += [crossover(a, b, SPACE, rng) for a, b in zip(out[:10], out[10:20])]
        return out

    got = run(3)
    assert got == run(3) and got != run(4)
    for a in got:
        assert a.check(SPACE) == a
    assert len({a.key() for a in got}) > 20
    big, small = largest(SPACE), smallest(SPACE)
    assert mutate(big, SPACE, random.Random(0), 0.0) == big
    assert mutate(big, SPACE, random.Random(0), 1.0) != big
    children = [crossover(big, small, SPACE, random.Random(s)) for s in range(20)]
    for c in children:  # every gene comes from one of the parents
        assert c.width in (big.width, small.width)
        assert all(k in (3, 7) for row in c.kernels for k in row)
    assert any(c.width == big.width for c in children) and any(c.width == small.width for c in children)


def test_extract_matches_supernet_and_cost_model():
    net = make_net()
    x = images()
    for a in archs(TINY):
        net.set_active(a)
        with torch.no_grad():
            ref = net(x)
        m = net.extract(a)
        with torch.no_grad():
            got = m(x)
        assert got.shape == (len(x), DIM)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
        assert arch_flops(a, TINY, DIM) == count_flops(m, (1, 28, 28))
        assert arch_params(a, TINY, DIM) == count_params(m)
        rebuilt = create_backbone("nas_mbv3", in_channels=1, arch=a.to_dict(), space=TINY.to_dict())
        assert [t.shape for t in rebuilt.state_dict().values()] == [t.shape for t in m.backbone.state_dict().values()]


def test_cost_model_matches_flop_counter_on_the_default_space():
    for a in archs(SPACE, 3):
        m = Supernet(SPACE, 128).extract(a)
        assert arch_flops(a, SPACE, 128) == count_flops(m, (1, 28, 28))
        assert arch_params(a, SPACE, 128) == count_params(m)


def test_default_space_spans_edge_budgets():
    lo, hi = arch_flops(smallest(SPACE), SPACE, 128), arch_flops(largest(SPACE), SPACE, 128)
    print(f"\nsmallest {lo / 1e6:.3f} MFLOPs {arch_params(smallest(SPACE), SPACE, 128):,} params; "
          f"largest {hi / 1e6:.3f} MFLOPs {arch_params(largest(SPACE), SPACE, 128):,} params")
    assert lo < 0.8e6 and hi > 8e6
    assert hi < 62.06e6 / 3.5  # still a real cut against the cloud ResNet-20


def test_extract_matches_after_bn_recalibration():
    net = make_net()
    calib = [images(16, seed=s) for s in range(3)]
    x = images(seed=9)
    for a in archs(TINY, 2):
        net.set_active(a)
        recalibrate_bn(net, calib)
        assert not net.training
        with torch.no_grad():
            ref = net(x)
        m = net.extract(a)
        torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=0)
        # recalibrating the extracted model alone gives the same statistics: a plain average over the batches
        m2 = recalibrate_bn(net.extract(a), calib)
        torch.testing.assert_close(m2(x), ref, atol=1e-5, rtol=0)
    with pytest.raises(HeteroError, match="at least one batch"):
        recalibrate_bn(net, [])


def test_recalibration_averages_over_batches():
    bn = torch.nn.BatchNorm2d(3)
    batches = [torch.randn(4, 3, 5, 5) + i for i in range(3)]
    recalibrate_bn(bn, batches)
    torch.testing.assert_close(bn.running_mean, torch.stack([b.mean((0, 2, 3)) for b in batches]).mean(0))
    assert bn.momentum == 0.1 and not bn.training


def test_a_step_on_one_subnet_touches_only_its_slices():
    net = make_net().train()
    a = smallest(TINY)
    net.set_active(a)
    net(images()).sum().backward()
    blocks = {(b.stage, b.slot): b for b in a.blocks(TINY)}
    for i, stage in enumerate(net.stages):
        for j, blk in enumerate(stage):
            if (i, j) not in blocks:
                assert all(p.grad is None for p in blk.parameters())
                continue
            b = blocks[(i, j)]
            g = blk.expand.weight.grad
            assert g[:b.mid, :b.cin].abs().sum() > 0
            assert g[b.mid:].abs().sum() == 0 and g[:, b.cin:].abs().sum() == 0
            gd = blk.dw.weight.grad
            s = (7 - b.kernel) // 2
            inside = torch.zeros_like(gd, dtype=torch.bool)
            inside[:b.mid, :, s:s + b.kernel, s:s + b.kernel] = True
            # exact zeros outside the active slice (a count, not a comparison of two float sums)
            assert torch.count_nonzero(gd[inside]) > 0 and torch.count_nonzero(gd[~inside]) == 0
            assert blk.bn1.weight.grad[b.mid:].abs().sum() == 0
            assert blk.se_fc1.weight.grad is None  # SE off in the smallest arch
    out = a.out_features(TINY)
    assert net.proj.weight.grad[:, out:].abs().sum() == 0 and net.proj.weight.grad[:, :out].abs().sum() > 0


def test_shared_weights_are_one_tensor():
    net = make_net()
    m_big, m_small = net.extract(largest(TINY)), net.extract(smallest(TINY))
    w = net.stages[0][0].expand.weight
    mid, cin = m_small.backbone.blocks[0].expand[0].weight.shape[:2]
    torch.testing.assert_close(m_small.backbone.blocks[0].expand[0].weight, w[:mid, :cin])
    torch.testing.assert_close(m_big.backbone.blocks[0].expand[0].weight, w)


def test_sort_channels_keeps_the_largest_subnet():
    net = make_net()
    x = images()
    net.set_active(largest(TINY))
    with torch.no_grad():
        before = net(x)
        w = net.stages[1][0].expand.weight.clone()
    net.sort_channels()
    with torch.no_grad():
        torch.testing.assert_close(net(x), before, atol=1e-5, rtol=0)
    imp = net.stages[1][0].expand.weight.abs().sum((1, 2, 3))
    assert torch.all(imp[:-1] >= imp[1:]) and not torch.equal(net.stages[1][0].expand.weight, w)


def test_kernel_transform_subnets_extract_exactly():
    space = replace(TINY, kernel_transform=True)
    net = make_net(space)
    assert sorted(net.stages[0][0].transforms) == ["5to3", "7to5"]
    for blk in (b for st in net.stages for b in st):
        for t in blk.transforms.values():
            t.data += 0.05 * torch.randn_like(t)
    x = images()
    for a in archs(space, 3):
        net.set_active(a)
        with torch.no_grad():
            torch.testing.assert_close(net.extract(a)(x), net(x), atol=1e-5, rtol=0)
    # identity-initialised transforms are the plain centre crop
    plain, trans = make_net(TINY), make_net(replace(TINY, kernel_transform=True))
    a = smallest(TINY)
    plain.set_active(a)
    trans.set_active(a)
    with torch.no_grad():
        torch.testing.assert_close(trans(x), plain(x))


def test_extracted_subnet_checkpoints_and_exports(tmp_path):
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'hetero[onnx]')")
    from export import export_checkpoint

    net = make_net()
    a = sample(TINY, random.Random(5))
    a = replace(a, se=tuple(tuple(True for _ in r) for r in a.se))  # exercise the SE path in the export
    model = net.extract(a)
    spec = ModelSpec("nas_mbv3", DIM, {"arch": a.to_dict(), "space": TINY.to_dict()})
    ck = Checkpoint(role="edge", spec=spec, model=model, classifier=None, preprocess=FASHION_MNIST_PREPROCESS,
                    classes=tuple(str(i) for i in range(10)), space="0" * 64)
    save_checkpoint(ck, tmp_path / "ck")
    back = load_checkpoint(tmp_path / "ck", role="edge")
    x = images()
    with torch.no_grad():
        assert torch.equal(back.model(x), model(x))
    manifest = export_checkpoint(back, tmp_path / "x", formats=("onnx",))
    (art,) = manifest["artifacts"]
    assert art["fidelity"]["min_cosine"] > 0.99999


def test_static_backbone_defaults_and_channel_mismatch():
    m = create_backbone("nas_mbv3", in_channels=3)
    assert m.arch == largest(SearchSpace(in_channels=3)) and m.out_features == 64
    with pytest.raises(HeteroError, match="3-channel input"):
        create_backbone("nas_mbv3", in_channels=1, space=SearchSpace(in_channels=3).to_dict())
    with pytest.raises(HeteroError, match=r"arch\.depths\[0\]"):
        create_backbone("nas_mbv3", in_channels=1, arch={**largest(SPACE).to_dict(), "depths": [2, 3, 3, 3]})


@pytest.mark.parametrize("first", ["hetero.nas.supernet", "hetero.models"])
def test_imports_work_in_either_order(first):
    import subprocess
    import sys

    code = f"import {first}; from hetero.nas import Supernet; from hetero.models import list_backbones; " \
           "assert 'nas_mbv3' in list_backbones() and Supernet"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_last_conv_head_extracts_and_counts_exactly():
    """``head``: MobileNetV3's last 1x1 conv at a fixed width, sliced on its input like every layer;
    a stride-1 stem too (the hand-designed MobileNet's layout). Extract equals the supernet, the cost
    model equals the FLOP counter, and the latency table decomposes it."""
    from hetero.nas.latency import decompose

    sp = replace(TINY, head=32, stem_stride=1)
    net = make_net(sp)  # BN statistics and affine parameters that are not the identity, the head's too
    x = images()
    for a in archs(sp, 4):
        net.set_active(a)
        with torch.no_grad():
            ref = net(x)
        m = net.extract(a)
        assert m.backbone.out_features == 32
        with torch.no_grad():
            torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=0)
        assert arch_flops(a, sp, DIM) == count_flops(m, (1, 28, 28))
        assert arch_params(a, sp, DIM) == count_params(m)
        assert [b.type for b in decompose(m, (1, 28, 28))][-2:] == ["conv_bn_relu", "head"]
    assert SearchSpace.from_dict({k: v for k, v in SPACE.to_dict().items() if k != "head"}).head == 0  # older files
    with pytest.raises(HeteroError, match="space.head"):
        SearchSpace(head=-1)
