"""train-supernet, search and train-edge --arch on the tiny cloud and synthetic data: outputs, resume
after an interruption, budgets honoured, bad input as one line."""
from __future__ import annotations

import json

import pytest
import torch

from clitest import one_line_error, run
from hetero.app.cli import main
from hetero.errors import HeteroError

SN = ["--data", "synthetic", "--limit", "600", "--val-size", "120", "--batch-size", "64", "--quiet"]



@pytest.fixture(scope="module")
def supernet(saved, tmp_path_factory, small_space):
    out = tmp_path_factory.mktemp("nas") / "supernet"
    space = out.with_name("space.json")
    space.write_text(json.dumps(small_space))
    assert main(["train-supernet", "--cloud", str(saved / "cloud"), "--out", str(out), "--epochs", "1", "--space",
                 str(space), *SN]) == 0
    return out


@pytest.fixture(scope="module")
def searched(supernet, saved, tmp_path_factory):
    from hetero.nas.space import largest, smallest
    from hetero.nas.supernet import arch_flops
    from hetero.nas.train import load_supernet

    net, _ = load_supernet(supernet)
    lo, hi = arch_flops(smallest(net.space), net.space, 16), arch_flops(largest(net.space), net.space, 16)
    budget = lo + 0.1 * (hi - lo)
    out = tmp_path_factory.mktemp("nas") / "search"
    code = main(["search", "--supernet", str(supernet), "--cloud", str(saved / "cloud"), "--data", "synthetic",
                 "--budget", f"flops={budget / 1e6:.4f}M", "--budget", "params=40k", "--out", str(out),
                 "--population", "4", "--generations", "1", "--quiet"])
    assert code == 0
    return out, budget


def test_supernet_directory(supernet, saved):
    from hetero.checkpoint import load_checkpoint
    from hetero.nas.train import load_supernet

    net, meta = load_supernet(supernet)
    assert meta["cloud_space"] == load_checkpoint(saved / "cloud").space and meta["epochs_done"] == 1
    assert meta["split"] == {"train": 480, "val": 120, "seed": 0, "val_digest": meta["split"]["val_digest"]}
    hist = meta["history"][0]
    assert {"largest.total", "smallest.total", "random.total", "smallest.distill"} <= set(hist)
    assert hist["subnets_per_step"] == 4 and not (supernet / "train_state.pt").exists()  # finished: no resume state


def test_resume_after_an_interruption_gives_the_same_weights(saved, synth, tmp_path, monkeypatch, small_space):
    from hetero.checkpoint import load_checkpoint
    from hetero.data import load_dataset
    from hetero.nas import train as nt

    cloud = load_checkpoint(saved / "cloud")
    data = load_dataset("synthetic", "train")
    cfg = nt.SupernetConfig(epochs=2, batch_size=64, limit=300, val_size=60, n_random=1, space=small_space)
    nt.train_supernet(cfg, cloud, data, tmp_path / "full", progress=False, log=lambda s: None)
    real = nt.save_supernet

    def save_then_die(*a, **k):
        real(*a, **k)
        raise KeyboardInterrupt  # as if killed right after the first epoch's checkpoint

    monkeypatch.setattr(nt, "save_supernet", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        nt.train_supernet(cfg, cloud, data, tmp_path / "cut", progress=False, log=lambda s: None)
    monkeypatch.setattr(nt, "save_supernet", real)
    assert nt.load_supernet(tmp_path / "cut")[1]["epochs_done"] == 1
    with pytest.raises(HeteroError, match="already exists; pass --resume"):
        nt.train_supernet(cfg, cloud, data, tmp_path / "cut", progress=False, log=lambda s: None)
    nt.train_supernet(cfg, cloud, data, tmp_path / "cut", resume=True, progress=False, log=lambda s: None)
    a, b = nt.load_supernet(tmp_path / "full")[0].state_dict(), nt.load_supernet(tmp_path / "cut")[0].state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_search_outputs_and_budgets(searched):
    from hetero.nas.space import Arch, SearchSpace

    out, budget = searched
    res = json.loads((out / "pareto.json").read_text())
    assert res["evaluations"] == len(res["candidates"]) >= 4 and res["search_seconds"] > 0
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for f in ("arch.json", "arch-flops-{}M.json".format(f"{budget / 1e6:.4f}"), "arch-params-40k.json"):
        doc = json.loads((out / f).read_text())
        Arch.from_dict(doc["arch"], SearchSpace.from_dict(doc["space"]))
    first = json.loads((out / "arch.json").read_text())
    assert first["flops"] <= budget and 0 <= first["val_map_at_r"] <= 1
    assert json.loads((out / "arch-params-40k.json").read_text())["params"] <= 40_000
    best = max((c for c in res["candidates"] if c["flops"] <= budget), key=lambda c: c["map_at_r"])
    assert first["val_map_at_r"] == best["map_at_r"]  # the best feasible one evaluated
    front = [res["candidates"][i] for i in res["pareto_flops"]]
    assert all(a["flops"] <= b["flops"] and a["map_at_r"] < b["map_at_r"] for a, b in zip(front, front[1:]))


def test_train_edge_from_the_searched_arch_exports_and_verifies(searched, supernet, saved, tmp_path, capsys):
    from hetero.checkpoint import load_checkpoint

    out, _ = searched
    code, _, err = run(capsys, "train-edge", "--cloud", saved / "cloud", "--out", tmp_path / "edge", "--arch",
                       out / "arch.json", "--init-from", supernet, "--data", "synthetic", "--limit", "300", "--epochs",
                       "1", "--quiet")
    assert code == 0, err
    ck = load_checkpoint(tmp_path / "edge")
    assert ck.spec.backbone == "nas_mbv3" and ck.spec.backbone_kwargs["arch"] == json.loads((out / "arch.json").read_text())["arch"]
    assert run(capsys, "export", "--edge", tmp_path / "edge", "--out", tmp_path / "x", "--formats", "onnx")[0] == 0
    code, _, err = run(capsys, "verify", "--manifest", tmp_path / "x", "--cloud", saved / "cloud", "--data", "synthetic",
                       "--out", tmp_path / "v", "--no-latency", "--no-html", "--quiet")
    assert code in (0, 1), err  # gates may fail on a one-epoch model; it must run
    assert json.loads((tmp_path / "v" / "report.json").read_text())["verdict"]["ran"] == 2


def test_bad_input(supernet, searched, saved, tmp_path, capsys):
    out, _ = searched
    common = ["search", "--supernet", supernet, "--cloud", saved / "cloud", "--data", "synthetic", "--out",
              tmp_path / "s", "--population", "2", "--generations", "0", "--quiet"]
    code, _, err = run(capsys, *common, "--budget", "flops=1k")
    one_line_error(code, err, "no architecture in the space meets flops=1k", "smallest achievable")
    one_line_error(*run(capsys, *common, "--budget", "latency=0.5ms@no-such-device")[::2], "no-such-device")
    one_line_error(*run(capsys, *common, "--budget", "speed=fast")[::2], "not understood")
    one_line_error(*run(capsys, *common, "--budget", "params=40k", "--val-limit", "10")[::2], "too few")
    one_line_error(*run(capsys, *[a if a != saved / "cloud" else saved / "edge" for a in common], "--budget",
                        "params=40k")[::2], "cloud")
    assert not (tmp_path / "s").exists()
    doc = json.loads((out / "arch.json").read_text())
    doc["arch"]["depths"][1] = 9
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    one_line_error(*run(capsys, "train-edge", "--cloud", saved / "cloud", "--out", tmp_path / "e", "--arch",
                        tmp_path / "bad.json", "--data", "synthetic", "--quiet")[::2], "arch.depths[1] = 9")
    assert not (tmp_path / "e").exists()


def test_supernet_from_another_cloud_space_is_refused(supernet, saved, tmp_path, capsys):
    import shutil

    d = tmp_path / "sn"
    shutil.copytree(supernet, d)
    meta = json.loads((d / "supernet.json").read_text())
    meta["cloud_space"] = "ab" * 32
    (d / "supernet.json").write_text(json.dumps(meta))
    code, _, err = run(capsys, "search", "--supernet", d, "--cloud", saved / "cloud", "--data", "synthetic", "--out",
                       tmp_path / "s", "--budget", "params=40k", "--quiet")
    one_line_error(code, err, "cloud space abababababab")


@pytest.mark.slow
def test_latency_budget_from_the_look_up_table(tmp_path):
    """Latency predicted from the devices layer's table: blocks measured once into the file, overhead
    calibrated once, a second search reads the table and measures nothing; a table of another
    profile is refused. (A one-arch-per-gene tiny space keeps the ONNX exports few.)"""
    from hetero.app.search import latency_from_table as lut_latency
    from hetero.nas import latency as L
    from hetero.nas.space import SearchSpace, largest, smallest
    from hetero.nas.supernet import Supernet

    torch.manual_seed(0)
    sp = SearchSpace(stem=8, stages=((8, 1, 1), (8, 1, 2)), kernels=(3, 5), expands=(2,), widths=(1.0,), se=(False,))
    net = Supernet(sp, 16).eval()
    lut = tmp_path / "lut.json"
    ms = lut_latency(net, smallest(sp), lut, "host-cpu-1thread")
    table = L.load_table(lut)
    assert ms > 0 and table["overhead_ms"] is not None and table["profile"] == "host-cpu-1thread"
    blocks = L.decompose(net.extract(largest(sp)), (1, 28, 28))
    assert L.arch_blocks(largest(sp), sp, 16) == blocks
    assert [b.type for b in blocks] == ["conv_bn_relu", "inverted_residual", "inverted_residual", "head"]
    assert not L.missing_blocks(blocks, table)  # the calibration subnets covered the largest one's blocks
    expect = sum(table["entries"][b.key("host-cpu-1thread", 1)][table["stat"]] for b in blocks) + table["overhead_ms"]
    before = lut.read_bytes()
    assert lut_latency(net, largest(sp), lut, "host-cpu-1thread") == pytest.approx(expect)
    assert lut.read_bytes() == before  # nothing measured again
    with pytest.raises(HeteroError, match="measured on profile host-cpu-1thread"):
        lut_latency(net, largest(sp), lut, "host-cpu")


def test_train_supernet_with_a_space_file(saved, tmp_path, capsys):
    """--space changes the defaults (here a stride-1 stem and MobileNetV3's last conv); the space is kept
    with the supernet, its subnets extract with the head; a bad field or a contradicted input is one line."""
    from hetero.nas.space import largest
    from hetero.nas.train import load_supernet

    sp = tmp_path / "space.json"
    sp.write_text(json.dumps({"stem": 8, "stem_stride": 1, "stages": [[8, 1, 2], [16, 1, 2]], "kernels": [3],
                              "expands": [2], "widths": [1.0], "head": 32}))
    out = tmp_path / "sn"
    assert main(["train-supernet", "--cloud", str(saved / "cloud"), "--out", str(out), "--epochs", "1", "--search-space", str(sp),
                 "--data", "synthetic", "--limit", "300", "--val-size", "100", "--batch-size", "64", "--quiet"]) == 0
    net, meta = load_supernet(out)
    assert meta["space"]["head"] == 32 and meta["space"]["stem_stride"] == 1 and meta["config"]["space"]["head"] == 32
    assert net.extract(largest(net.space)).backbone.out_features == 32
    capsys.readouterr()
    sp.write_text(json.dumps({"head": 32, "colour": 1}))
    one_line_error(*run(capsys, "train-supernet", "--cloud", saved / "cloud", "--out", tmp_path / "x", "--space", sp,
                        *SN)[::2], "unknown key", "colour")
    sp.write_text(json.dumps({"input_size": 64}))
    one_line_error(*run(capsys, "train-supernet", "--cloud", saved / "cloud", "--out", tmp_path / "x", "--space", sp,
                        *SN)[::2], "input_size")
    one_line_error(*run(capsys, "train-supernet", "--cloud", saved / "cloud", "--out", tmp_path / "x", "--space",
                        tmp_path / "none.json", *SN)[::2], "does not exist")
    assert not (tmp_path / "x").exists()


def test_every_width_that_fits_the_budget_starts_in_the_population(supernet, saved):
    """A budget only the shallowest wide nets meet: a uniform draw filtered by the budget almost never
    lands there, so the first population is filled a width at a time (the 2026-11-26 benchmark's
    search scored 189 width-0.5 archs of 198 before this)."""
    import random

    from hetero.checkpoint import load_checkpoint
    from hetero.data import load_dataset
    from hetero.app.search import Evaluator, SearchConfig
    from hetero.nas.evolution import evolve, parse_budget
    from hetero.nas.space import smallest
    from hetero.nas.supernet import arch_flops
    from hetero.nas.train import load_supernet

    net, meta = load_supernet(supernet)
    cfg = SearchConfig(population=6, generations=0)
    ev = Evaluator(net, meta, load_checkpoint(saved / "cloud"), load_dataset("synthetic", "train"), cfg, progress=False)
    wide = max(net.space.widths)
    budget = 1.1 * arch_flops(smallest(net.space, wide), net.space, ev.dim)
    b = parse_budget(f"flops={budget / 1e6:.6f}M")
    best = evolve(ev.candidates, net.space, b, cfg.evolution, random.Random(0))
    widths = {rec["arch"]["width"] for rec in ev.records.values()}
    assert widths == set(net.space.widths), widths
    assert ev.cost(best, b) <= budget and all(rec["flops"] <= budget for rec in ev.records.values())


def test_finetuning_the_finalists_chooses_among_the_proxys_top_n(supernet, saved, tmp_path, capsys):
    """--finetune-top N: the proxy's top N are fine-tuned briefly (scored on the validation split,
    never trained on it) and the choice is the best fine-tuned subnet that fits, recorded in pareto.json."""
    from hetero.nas.space import Arch
    from hetero.nas.train import load_supernet

    net, _ = load_supernet(supernet)
    out = tmp_path / "search"
    code, _, err = run(capsys, "search", "--supernet", supernet, "--cloud", saved / "cloud", "--data", "synthetic",
                       "--budget", "params=40k", "--out", out, "--population", "4", "--generations", "0",
                       "--finetune-top", "2", "--finetune-epochs", "1", "--finetune-losses", "influence=1", "--quiet")
    assert code == 0, err
    res = json.loads((out / "pareto.json").read_text())
    fits = sorted((c for c in res["candidates"] if c["params"] <= 40_000), key=lambda c: c["map_at_r"], reverse=True)
    top = [Arch.from_dict(c["arch"], net.space).key() for c in fits[:2]]
    ft = {Arch.from_dict(f["arch"], net.space).key(): f for f in res["finetuned"]}
    assert sorted(ft) == sorted(top)  # exactly the proxy's top 2 were fine-tuned
    assert all(f["epochs"] == 1 and f["losses"] == {"influence": 1} and 0 < f["map_at_r"] <= 1 for f in ft.values())
    chosen = json.loads((out / "arch.json").read_text())
    key = Arch.from_dict(chosen["arch"], net.space).key()
    assert key in ft and ft[key]["map_at_r"] == max(f["map_at_r"] for f in ft.values())
    assert chosen["val_map_at_r_finetuned"] == ft[key]["map_at_r"]
    code, _, err = run(capsys, "search", "--supernet", supernet, "--cloud", saved / "cloud", "--data", "synthetic",
                       "--budget", "params=40k", "--out", tmp_path / "bad", "--finetune-top", "-1", "--quiet")
    one_line_error(code, err, "--finetune-top")


def test_the_evolution_runs_on_any_reward_and_cost():
    """The evolution is pure: a made-up reward (more kernel area is better) under a FLOPs budget, no
    data, no supernet. It returns the best scored arch that fits, warm-starts a second budget from the
    first's candidates, and names the smallest achievable cost when nothing fits."""
    import random

    from hetero.nas.evolution import Candidates, EvolutionConfig, evolve, pareto_front, parse_budget
    from hetero.nas.space import SearchSpace, largest, smallest
    from hetero.nas.supernet import arch_flops

    sp = SearchSpace(stem=8, stages=((8, 1, 1), (12, 2, 2), (16, 2, 2)), kernels=(3, 5), expands=(2, 3), widths=(0.5, 1.0))
    flops = lambda a, b: float(arch_flops(a, sp, 16))  # noqa: E731
    reward = lambda a: sum(k * k for i, row in enumerate(a.kernels) for k in row[:a.depths[i]])  # noqa: E731
    cand = Candidates(reward, flops)
    mid = (flops(smallest(sp), None) + flops(largest(sp), None)) / 2
    budget = parse_budget(f"flops={mid / 1e6:.6f}M")
    cfg = EvolutionConfig(population=6, generations=2)
    best = evolve(cand, sp, budget, cfg, random.Random(0))
    fits = [(r, a) for a, r in cand.scores.values() if flops(a, None) <= budget.value]
    assert flops(best, None) <= budget.value and reward(best) == max(r for r, _ in fits)
    assert evolve(Candidates(reward, flops), sp, budget, cfg, random.Random(0)) == best  # seeded
    looser = evolve(cand, sp, parse_budget(f"flops={1.1 * mid / 1e6:.6f}M"), EvolutionConfig(population=6, generations=0),
                    random.Random(1))
    assert reward(looser) >= reward(best)  # the looser budget starts from the first one's best
    with pytest.raises(HeteroError, match="no architecture in the space meets flops=1k: the smallest achievable is"):
        evolve(cand, sp, parse_budget("flops=1k"), cfg, random.Random(0))
    recs = [{"flops": f, "map_at_r": m} for f, m in ((3, 0.5), (1, 0.2), (2, 0.1), (4, 0.6), (5, 0.55))]
    assert pareto_front(recs) == [1, 0, 3]


def test_the_python_api_searches_and_says_where_each_budget_s_arch_is(supernet, saved, tmp_path):
    import hetero
    from hetero.app.search import SearchConfig

    r = hetero.search(supernet, saved / "cloud", ["params=40k", "params=60k"], data="synthetic", out=tmp_path / "s",
                      cfg=SearchConfig(population=2, generations=0), progress=False, log=lambda _: None)
    assert isinstance(r, hetero.SearchResult) and r.path == tmp_path / "s"
    assert set(r.best) == set(r.arch_files) == {"params=40k", "params=60k"}
    for budget, f in r.arch_files.items():
        doc = json.loads(f.read_text())
        assert doc["budget"] == budget and doc["arch"] == r.best[budget]["arch"]
        assert doc["params"] <= float(budget[len("params="):-1]) * 1e3  # within its budget
    assert json.loads((r.path / "pareto.json").read_text())["best"] == json.loads(json.dumps(r.best))
