"""The architecture space of the elastic MobileNetV3-style supernet, and the architectures in it.

A :class:`SearchSpace` fixes the largest network (stem, stages of inverted-residual blocks) and the
choices per gene; an :class:`Arch` picks one value per gene: a width multiplier for the whole net,
a depth per stage, and a kernel size, expand ratio and squeeze-excite switch per block slot. Slots
beyond a stage's active depth keep their genes, so mutation and crossover can bring them back.
:func:`Arch.blocks` resolves an arch into concrete block shapes; the supernet, the static network,
the analytic cost model and the latency predictor all read that one function.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

from hetero.errors import HeteroError

STEM_KERNEL = 3
SE_REDUCTION = 4


def channels(c: float) -> int:
    """Round a channel count to a multiple of 4, at least 4 (as the MobileNet backbones do)."""
    return max(4, int(round(c / 4.0)) * 4)


def conv_out(size: int, kernel: int, stride: int) -> int:
    """Spatial size after a convolution padded by ``kernel // 2``."""
    return (size + 2 * (kernel // 2) - kernel) // stride + 1


@dataclass(frozen=True)
class SearchSpace:
    """Choices of the supernet. ``stages`` are (max out_channels, max depth, stride) at width 1.

    The defaults suit 28 px inputs: a stride-2 stem (14 px), then 14, 7, 4 and 4 px stages. Their
    subnets span 0.40 to 15.95 MFLOPs at dim 128 (``arch_flops``, equal to
    ``hetero.models.complexity.count_flops``; 1 MAC = 2 FLOPs), i.e. 3.9x to 153x below the cloud
    ResNet-20's 62.06 MFLOPs.
    ``kernel_transform`` gives the supernet OFA's learned kernel transformation matrices (the
    static subnets do not need them). ``head`` adds MobileNetV3's last 1x1 convolution (with batch
    norm and ReLU) to that many channels, whatever the width, before pooling; 0 leaves it out.
    """

    stem: int = 16
    stem_stride: int = 2
    stages: tuple[tuple[int, int, int], ...] = ((16, 1, 1), (24, 3, 2), (40, 3, 2), (64, 3, 1))
    kernels: tuple[int, ...] = (3, 5, 7)
    expands: tuple[int, ...] = (2, 3, 4, 6)
    widths: tuple[float, ...] = (0.5, 0.75, 1.0)
    se: tuple[bool, ...] = (False, True)
    input_size: int = 28
    in_channels: int = 1
    kernel_transform: bool = False
    head: int = 0  # MobileNetV3's last 1x1 conv (+BN+ReLU) to this many channels before pooling; 0: none

    def __post_init__(self):
        def bad(field: str, value: Any, want: str) -> HeteroError:
            return HeteroError(f"space.{field} = {value!r} is invalid; expected {want}")

        if not self.stages:
            raise bad("stages", self.stages, "at least one (out_channels, depth, stride) stage")
        for i, st in enumerate(self.stages):
            if len(st) != 3 or not all(_is_int(v) for v in st) or st[0] < 1 or st[1] < 1 or st[2] not in (1, 2):
                raise bad(f"stages[{i}]", st, "(out_channels >= 1, depth >= 1, stride 1 or 2)")
        for name, ok, want in (("kernels", lambda k: _is_int(k) and k >= 1 and k % 2 == 1, "odd kernel sizes"),
                               ("expands", lambda e: _is_number(e) and e > 0, "positive expand ratios"),
                               ("widths", lambda w: _is_number(w) and w > 0, "positive width multipliers"),
                               ("se", lambda s: isinstance(s, bool), "booleans")):
            vals = getattr(self, name)
            if not vals or len(set(vals)) != len(vals) or not all(ok(v) for v in vals):
                raise bad(name, vals, f"a non-empty list of distinct {want}")
        if not _is_int(self.stem) or self.stem < 1 or self.stem_stride not in (1, 2):
            raise bad("stem", (self.stem, self.stem_stride), "stem >= 1 channels and stem_stride 1 or 2")
        if not _is_int(self.head) or self.head < 0:
            raise bad("head", self.head, "0 (no last 1x1 conv) or its channel count")
        if not _is_int(self.input_size) or self.input_size < 1 or not _is_int(self.in_channels) or self.in_channels < 1:
            raise bad("input_size/in_channels", (self.input_size, self.in_channels), "positive integers")

    @property
    def max_kernel(self) -> int:
        return max(self.kernels)

    @property
    def max_width(self) -> float:
        return max(self.widths)

    def stem_channels(self, width: float) -> int:
        return channels(self.stem * width)

    def stage_channels(self, width: float) -> tuple[int, ...]:
        return tuple(channels(c * width) for c, _, _ in self.stages)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["stages"] = [list(s) for s in self.stages]
        for k in ("kernels", "expands", "widths", "se"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: Any) -> "SearchSpace":
        if not isinstance(d, dict):
            raise HeteroError(f"the search space must be a JSON object, got {type(d).__name__}; pass the space "
                              "written next to the supernet or arch")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise HeteroError(f"space has unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        kw: dict[str, Any] = dict(d)
        try:
            if "stages" in kw:
                kw["stages"] = tuple(tuple(s) for s in kw["stages"])
            for k in ("kernels", "expands", "widths", "se"):
                if k in kw:
                    kw[k] = tuple(kw[k])
            if "widths" in kw:
                kw["widths"] = tuple(float(w) if _is_number(w) else w for w in kw["widths"])
        except TypeError:
            raise HeteroError(f"space is malformed ({kw!r:.200}); lists expected for stages and choices") from None
        return cls(**kw)


class Block(NamedTuple):
    """One active inverted-residual block, resolved to concrete shapes."""

    stage: int
    slot: int
    cin: int
    mid: int
    cout: int
    kernel: int
    stride: int
    se: bool
    hidden: int  # squeeze-excite bottleneck channels (0 without SE)
    size_in: int
    size_out: int

    @property
    def residual(self) -> bool:
        return self.stride == 1 and self.cin == self.cout


def se_hidden(mid: int) -> int:
    return channels(mid / SE_REDUCTION)


def mid_channels(cin: int, expand: float) -> int:
    return channels(cin * expand)


@dataclass(frozen=True)
class Arch:
    """One subnet: genes for every block slot of the space (inactive slots included)."""

    width: float
    depths: tuple[int, ...]
    kernels: tuple[tuple[int, ...], ...]
    expands: tuple[tuple[int, ...], ...]
    se: tuple[tuple[bool, ...], ...]

    def to_dict(self) -> dict[str, Any]:
        return {"width": float(self.width), "depths": list(self.depths), "kernels": [list(k) for k in self.kernels],
                "expands": [list(e) for e in self.expands], "se": [list(s) for s in self.se]}

    @classmethod
    def from_dict(cls, d: Any, space: SearchSpace) -> "Arch":
        """Validate ``d`` against ``space``; a one-line error names the first wrong field."""
        if isinstance(d, Arch):
            d = d.to_dict()
        if not isinstance(d, dict):
            raise HeteroError(f"an arch must be a JSON object, got {type(d).__name__}; pass the arch.json `hetero search` wrote")
        want = ("width", "depths", "kernels", "expands", "se")
        unknown = sorted(set(d) - set(want))
        if unknown:
            raise HeteroError(f"arch has unknown key(s) {', '.join(unknown)}; an arch has {', '.join(want)}")
        missing = [k for k in want if k not in d]
        if missing:
            raise HeteroError(f"arch is missing {', '.join(missing)}; an arch has {', '.join(want)}")

        def choice(name: str, v: Any, choices: tuple) -> Any:
            same_kind = isinstance(v, bool) if isinstance(choices[0], bool) else _is_number(v)
            if not same_kind or v not in choices:
                shown = ", ".join(_fmt(c) for c in choices)
                raise HeteroError(f"arch.{name} = {_fmt(v)} is outside the space (choices {shown})")
            return v

        def seq(name: str, v: Any, n: int, what: str) -> list:
            if not isinstance(v, (list, tuple)) or len(v) != n:
                got = f"{len(v)} entries" if isinstance(v, (list, tuple)) else type(v).__name__
                raise HeteroError(f"arch.{name} must be a list of {n} {what}, got {got}; the arch does not fit this space")
            return list(v)

        width = float(choice("width", d["width"], space.widths))
        nst = len(space.stages)
        depths = tuple(int(choice(f"depths[{i}]", v, tuple(range(1, space.stages[i][1] + 1))))
                       for i, v in enumerate(seq("depths", d["depths"], nst, "stage depths")))
        per_slot = {}
        for key, choices, what in (("kernels", space.kernels, "kernel sizes"), ("expands", space.expands, "expand ratios"),
                                   ("se", space.se, "squeeze-excite switches")):
            rows = seq(key, d[key], nst, "per-stage lists")
            per_slot[key] = tuple(
                tuple(choice(f"{key}[{i}][{j}]", v, choices)
                      for j, v in enumerate(seq(f"{key}[{i}]", row, space.stages[i][1], what)))
                for i, row in enumerate(rows))
        return cls(width=width, depths=depths, **per_slot)

    def check(self, space: SearchSpace) -> "Arch":
        """This arch, validated against ``space`` (raises a one-line HeteroError)."""
        return Arch.from_dict(self.to_dict(), space)

    def key(self) -> str:
        """Canonical JSON of what the subnet computes (inactive slots left out): equal keys, equal nets."""
        blocks = [[[self.kernels[i][j], self.expands[i][j], bool(self.se[i][j])] for j in range(dep)]
                  for i, dep in enumerate(self.depths)]
        return json.dumps({"width": float(self.width), "blocks": blocks}, sort_keys=True, separators=(",", ":"))

    def blocks(self, space: SearchSpace) -> list[Block]:
        """The active blocks, in order, with their channels, kernel, stride and spatial sizes."""
        out: list[Block] = []
        size = conv_out(space.input_size, STEM_KERNEL, space.stem_stride)
        cin = space.stem_channels(self.width)
        for i, cout in enumerate(space.stage_channels(self.width)):
            for j in range(self.depths[i]):
                stride = space.stages[i][2] if j == 0 else 1
                k, se = self.kernels[i][j], bool(self.se[i][j])
                mid = mid_channels(cin, self.expands[i][j])
                size_out = conv_out(size, k, stride)
                out.append(Block(i, j, cin, mid, cout, k, stride, se, se_hidden(mid) if se else 0, size, size_out))
                cin, size = cout, size_out
        return out

    def out_features(self, space: SearchSpace) -> int:
        return space.head or space.stage_channels(self.width)[-1]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and v.is_integer():
        return repr(v)
    return json.dumps(v) if isinstance(v, (str, list, dict)) or v is None else str(v)


_GENES = ("kernels", "expands", "se")  # per-slot genes; each has the space field of the same name


def _slots(space: SearchSpace) -> list[tuple[int, int]]:
    return [(i, j) for i, (_, depth, _) in enumerate(space.stages) for j in range(depth)]


def _build(space: SearchSpace, width: float, depths: list[int], genes: dict[str, dict[tuple[int, int], Any]]) -> Arch:
    per = {key: tuple(tuple(genes[key][(i, j)] for j in range(space.stages[i][1])) for i in range(len(space.stages)))
           for key in _GENES}
    return Arch(width=float(width), depths=tuple(depths), **per)


def sample(space: SearchSpace, rng: random.Random, width: float | None = None) -> Arch:
    """A uniformly random arch (each gene drawn independently), reproducible from ``rng``; ``width``
    fixes the width multiplier instead of drawing it."""
    width = rng.choice(space.widths) if width is None else width
    depths = [rng.randint(1, d) for _, d, _ in space.stages]
    genes = {key: {s: rng.choice(getattr(space, key)) for s in _slots(space)} for key in _GENES}
    return _build(space, width, depths, genes)


def largest(space: SearchSpace) -> Arch:
    genes = {key: {s: max(getattr(space, key)) for s in _slots(space)} for key in _GENES}
    return _build(space, space.max_width, [d for _, d, _ in space.stages], genes)


def smallest(space: SearchSpace, width: float | None = None) -> Arch:
    """The cheapest arch, at the narrowest width or at ``width``."""
    genes = {key: {s: min(getattr(space, key)) for s in _slots(space)} for key in _GENES}
    return _build(space, min(space.widths) if width is None else width, [1] * len(space.stages), genes)


def _genes(arch: Arch, space: SearchSpace) -> dict[str, dict[tuple[int, int], Any]]:
    return {key: {(i, j): getattr(arch, key)[i][j] for i, j in _slots(space)} for key in _GENES}


def mutate(arch: Arch, space: SearchSpace, rng: random.Random, prob: float = 0.1) -> Arch:
    """Redraw each gene (width, every depth, every slot's kernel/expand/SE) with probability ``prob``."""
    width = rng.choice(space.widths) if rng.random() < prob else arch.width
    depths = [rng.randint(1, d) if rng.random() < prob else arch.depths[i] for i, (_, d, _) in enumerate(space.stages)]
    genes = _genes(arch, space)
    for key in _GENES:
        for s in _slots(space):
            if rng.random() < prob:
                genes[key][s] = rng.choice(getattr(space, key))
    return _build(space, width, depths, genes)


def crossover(a: Arch, b: Arch, space: SearchSpace, rng: random.Random) -> Arch:
    """Per-gene uniform crossover: every gene comes from ``a`` or ``b`` with equal chance."""
    width = a.width if rng.random() < 0.5 else b.width
    depths = [a.depths[i] if rng.random() < 0.5 else b.depths[i] for i in range(len(space.stages))]
    ga, gb = _genes(a, space), _genes(b, space)
    genes = {key: {s: ga[key][s] if rng.random() < 0.5 else gb[key][s] for s in _slots(space)} for key in _GENES}
    return _build(space, width, depths, genes)
