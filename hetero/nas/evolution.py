"""Evolutionary architecture search under a cost budget (CMP-NAS's search, under a budget as in
Once-for-All): a population of archs, mutation and crossover, each candidate scored by a callable
and costed by another, and the Pareto front of what was scored. Nothing here loads data, exports or
times anything: :mod:`hetero.app.search` gives the reward (the subnet's compatibility on a
validation split) and the cost (FLOPs, parameters, or latency predicted or measured).
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any, Callable

from hetero.errors import HeteroError
from hetero.nas.space import Arch, SearchSpace, crossover, mutate, sample, smallest

_SUFFIX = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9}
UNITS = {"flops": "FLOPs", "params": "parameters", "latency": "ms"}


@dataclass(frozen=True)
class Budget:
    kind: str  # flops | params | latency
    value: float  # FLOPs, parameters, or milliseconds
    profile: str | None = None
    text: str = ""

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9.]+", "-", self.text).strip("-")


def parse_budget(text: str) -> Budget:
    """``flops=0.8M``, ``params=50k`` or ``latency=0.5ms@host-cpu-1thread`` (the profile's name is
    read, not looked up: ``hetero.app.search.parse_budgets`` checks it)."""
    m = re.fullmatch(r"\s*(flops|params)\s*=\s*([0-9]*\.?[0-9]+)\s*([kKmMgG]?)\s*", text or "")
    if m:
        value = float(m[2]) * _SUFFIX[m[3].lower()]
        if value <= 0:
            raise HeteroError(f"--budget {text}: the budget must be positive")
        return Budget(m[1], value, None, text.strip())
    m = re.fullmatch(r"\s*latency\s*=\s*([0-9]*\.?[0-9]+)\s*ms\s*@\s*([A-Za-z0-9_.-]+)\s*", text or "")
    if m:
        if float(m[1]) <= 0:
            raise HeteroError(f"--budget {text}: the budget must be positive")
        return Budget("latency", float(m[1]), m[2], text.strip())
    raise HeteroError(f"--budget {text!r} is not understood; use flops=0.8M, params=50k or latency=0.5ms@PROFILE "
                      "(see `hetero devices` for profiles)")


@dataclass(frozen=True)
class EvolutionConfig:
    population: int = 40
    generations: int = 5
    parents: float = 0.25  # fraction of the population kept as parents
    mutate_prob: float = 0.15
    mutation_share: float = 0.5  # children made by mutation (the rest by crossover)

    def __post_init__(self):
        if self.population < 2 or self.generations < 0 or not 0 < self.parents <= 1 or not 0 <= self.mutate_prob <= 1 \
                or not 0 <= self.mutation_share <= 1:
            raise HeteroError("evolution settings out of range: --population >= 2, --generations >= 0, "
                              "0 < --parents <= 1, --mutate-prob and --mutation-share in [0, 1]")


class Candidates:
    """Every arch scored so far, in the order first scored, with its reward (higher is better), over
    all the budgets of a search. ``reward(arch)`` scores a new arch; ``cost(arch, budget)`` costs one
    under a budget; ``cost_known(arch, budget)`` says whether that cost is at hand without a
    measurement (a latency not yet timed is not)."""

    def __init__(self, reward: Callable[[Arch], float], cost: Callable[[Arch, Budget], float],
                 cost_known: Callable[[Arch, Budget], bool] = lambda arch, budget: True):
        self.reward, self.cost, self.cost_known = reward, cost, cost_known
        self.scores: dict[str, tuple[Arch, float]] = {}

    def __len__(self) -> int:
        return len(self.scores)

    def score(self, arch: Arch) -> float:
        key = arch.key()
        if key not in self.scores:
            self.scores[key] = (arch, float(self.reward(arch)))
        return self.scores[key][1]

    def within(self, budget: Budget) -> list[Arch]:
        """Every scored arch whose cost fits ``budget``, best reward first (ties: first scored first);
        an arch whose cost is not known yet is left out, so this never starts a measurement."""
        fits = [(r, a) for a, r in self.scores.values()
                if self.cost_known(a, budget) and self.cost(a, budget) <= budget.value]
        fits.sort(key=lambda t: t[0], reverse=True)
        return [a for _, a in fits]


def format_count(x: float) -> str:
    """1.23M, 45.6k or 7.89: a FLOP or parameter count (or milliseconds) in three figures."""
    return f"{x / 1e6:.3g}M" if x >= 1e5 else f"{x / 1e3:.3g}k" if x >= 1e3 else f"{x:.3g}"


def _feasible_random(space: SearchSpace, cand: Candidates, budget: Budget, rng: random.Random, tries: int = 300,
                     width: float | None = None) -> Arch | None:
    """A random arch within ``budget`` (at ``width`` if given), or None if that width cannot meet it."""
    for _ in range(tries):
        a = sample(space, rng, width)
        if cand.cost(a, budget) <= budget.value:
            return a
    a = smallest(space, width)  # a tight budget: walk out from the smallest arch
    if cand.cost(a, budget) > budget.value:
        return None
    for _ in range(tries):
        b = mutate(a, space, rng, 0.3)
        if width is not None and b.width != width:
            continue
        if cand.cost(b, budget) <= budget.value:
            return b
    return a


def evolve(cand: Candidates, space: SearchSpace, budget: Budget, cfg: EvolutionConfig, rng: random.Random,
           on_eval: Callable[[], None] = lambda: None) -> Arch:
    """One evolutionary search under ``budget``; returns the best arch scored so far that fits it
    (over every budget's run, not only this one's). ``on_eval`` is called after each new score."""
    low = cand.cost(smallest(space), budget)
    if low > budget.value:
        raise HeteroError(f"no architecture in the space meets {budget.text}: the smallest achievable is "
                          f"{format_count(low)} {UNITS[budget.kind]}; raise the budget")

    def score(a: Arch) -> float:
        n = len(cand)
        r = cand.score(a)
        if len(cand) > n:
            on_eval()
        return r

    n_par = max(1, int(round(cfg.parents * cfg.population)))
    pop = {}
    for a in cand.within(budget)[:n_par]:
        pop[a.key()] = a  # warm start: the best candidates an earlier budget already scored that fit this one
    # random archs, a width at a time in turn: drawn uniformly and filtered by the budget, the narrow
    # widths would crowd out the wide ones (a wide, shallow net can fit a budget too, but a uniform
    # draw rarely lands there)
    widths = [w for w in space.widths if cand.cost(smallest(space, w), budget) <= budget.value]
    for i in range(5 * cfg.population):  # a tight budget may hold fewer distinct archs than the population
        if len(pop) >= cfg.population:
            break
        a = _feasible_random(space, cand, budget, rng, width=widths[i % len(widths)])
        if a is not None:
            pop[a.key()] = a
    scored = sorted(pop.values(), key=score, reverse=True)
    for _ in range(cfg.generations):
        parents = scored[:n_par]
        children: dict[str, Arch] = {}
        attempts = 0
        while len(children) < cfg.population - n_par and attempts < 50 * cfg.population:
            attempts += 1
            if rng.random() < cfg.mutation_share or len(parents) < 2:
                c = mutate(rng.choice(parents), space, rng, cfg.mutate_prob)
            else:
                a, b = rng.sample(parents, 2)
                c = crossover(a, b, space, rng)
            if c.key() not in children and cand.cost(c, budget) <= budget.value:
                children[c.key()] = c
        scored = sorted({a.key(): a for a in parents + list(children.values())}.values(), key=score, reverse=True)
        scored = scored[:cfg.population]
    return cand.within(budget)[0]


def pareto_front(records: list[dict[str, Any]], cost: str = "flops") -> list[int]:
    """Indices of the candidates no other beats on both lower cost and higher mAP@R."""
    order = sorted(range(len(records)), key=lambda i: (records[i][cost], -records[i]["map_at_r"]))
    front, best = [], -1.0
    for i in order:
        if records[i]["map_at_r"] > best:
            front.append(i)
            best = records[i]["map_at_r"]
    return front
