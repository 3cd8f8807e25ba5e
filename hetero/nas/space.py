"""The architecture space of the elastic MobileNetV3-style supernet, and the architectures in it.

A :class:`SearchSpace` fixes the largest network (stem, stages of inverted-residual blocks) and the
choices per gene; an :class:`Arch` picks one value per gene: a width multiplier for the whole net,
a depth per stage, a kernel size, expand ratio and squeeze-excite switch per block slot, and (in a
space with ``resolutions``) the input resolution. Slots beyond a stage's active depth keep their
genes, so mutation and crossover can bring them back.
:func:`Arch.blocks` resolves an arch into concrete block shapes; the supernet, the static network,
the analytic cost model and the latency predictor all read that one function.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple

from hetero.errors import HeteroError

STEM_KERNEL = 3
SE_REDUCTION = 4
ACTS = ("relu", "hswish")  # ReLU, or MobileNetV3's hard-swish
GATES = ("sigmoid", "hsigmoid")  # the squeeze-excite gate: sigmoid, or MobileNetV3's hard-sigmoid


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

    The MobileNetV3 details are optional fields (left at their defaults, a space reads and writes as
    it always has): ``resolutions`` makes the input resolution a gene (OFA's elastic resolution;
    images are loaded at ``input_size``, at least the largest choice, and resized down to the
    subnet's); ``min_depth`` is the shallowest a stage may be (OFA: 2; a stage of fewer blocks is
    fixed); ``acts`` is each stage's activation, ``stem_act``/``head_act`` the stem's and the last
    conv's (``relu`` or ``hswish``); ``se_gate`` the squeeze-excite gate (``sigmoid`` or
    ``hsigmoid``); ``stage_se`` fixes, per stage, whether its blocks have squeeze-excite (the ``se``
    choices then apply nowhere).
    ``SPACES`` names the presets (``mbv3-224``: OFA's MobileNetV3 space at 128-224 px RGB).
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
    resolutions: tuple[int, ...] = ()  # elastic input resolution choices; (): fixed at input_size
    min_depth: int = 1
    acts: tuple[str, ...] = ()  # per stage; (): relu everywhere
    stem_act: str = "relu"
    head_act: str = "relu"
    se_gate: str = "sigmoid"
    stage_se: tuple[bool, ...] = ()  # per stage: squeeze-excite fixed on or off; (): the se gene is free

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
        res = self.resolutions
        if len(set(res)) != len(res) or not all(_is_int(r) and 1 <= r <= self.input_size for r in res):
            raise bad("resolutions", list(res), f"distinct sizes from 1 to input_size ({self.input_size} px: images "
                      "are loaded at input_size and resized down to each), or [] for a fixed input size")
        if not _is_int(self.min_depth) or not 1 <= self.min_depth <= max(d for _, d, _ in self.stages):
            raise bad("min_depth", self.min_depth, "1 up to the deepest stage's max depth (a shallower stage keeps "
                      "its max depth)")
        for name, vals, n, allowed in (("acts", self.acts, len(self.stages), ACTS),
                                       ("stage_se", self.stage_se, len(self.stages), (False, True))):
            if vals and (len(vals) != n or not all(type(v) is type(allowed[0]) and v in allowed for v in vals)):
                raise bad(name, list(vals), f"[] or one of {', '.join(_fmt(a) for a in allowed)} per stage ({n})")
        for name, allowed in (("stem_act", ACTS), ("head_act", ACTS), ("se_gate", GATES)):
            if getattr(self, name) not in allowed:
                raise bad(name, getattr(self, name), " or ".join(allowed))

    @property
    def max_kernel(self) -> int:
        return max(self.kernels)

    @property
    def max_width(self) -> float:
        return max(self.widths)

    @property
    def resolution_choices(self) -> tuple[int, ...]:
        """The input resolutions a subnet can have: ``resolutions``, or the fixed ``input_size``."""
        return tuple(sorted(self.resolutions)) or (self.input_size,)

    def depth_choices(self, stage: int) -> tuple[int, ...]:
        """A stage's depths: ``min_depth`` (or, for a stage shallower than that, its max depth) up to its max."""
        d = self.stages[stage][1]
        return tuple(range(min(self.min_depth, d), d + 1))

    def act(self, stage: int) -> str:
        return self.acts[stage] if self.acts else "relu"

    def choices(self, key: str, stage: int) -> tuple:
        """A per-slot gene's choices in ``stage`` (``stage_se`` narrows squeeze-excite to one)."""
        if key == "se" and self.stage_se:
            return (self.stage_se[stage],)
        return tuple(getattr(self, key))

    def stem_channels(self, width: float) -> int:
        return channels(self.stem * width)

    def stage_channels(self, width: float) -> tuple[int, ...]:
        return tuple(channels(c * width) for c, _, _ in self.stages)

    def to_dict(self) -> dict[str, Any]:
        """JSON form; the optional MobileNetV3 fields only when they differ from their defaults, so
        a space without them writes (and fingerprints) as it always has."""
        d = {f.name: getattr(self, f.name) for f in fields(self)
             if f.name not in _OPTIONAL or getattr(self, f.name) != f.default}
        d["stages"] = [list(s) for s in self.stages]
        for k in ("kernels", "expands", "widths", "se", "resolutions", "acts", "stage_se"):
            if k in d:
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
            for k in ("kernels", "expands", "widths", "se", "resolutions", "acts", "stage_se"):
                if k in kw:
                    kw[k] = tuple(kw[k])
            if "widths" in kw:
                kw["widths"] = tuple(float(w) if _is_number(w) else w for w in kw["widths"])
        except TypeError:
            raise HeteroError(f"space is malformed ({kw!r:.200}); lists expected for stages and choices") from None
        return cls(**kw)


_OPTIONAL = ("resolutions", "min_depth", "acts", "stem_act", "head_act", "se_gate", "stage_se")

# Presets, by name (``--space NAME`` of `hetero train-supernet`): SearchSpace fields over the defaults.
SPACES: dict[str, dict[str, Any]] = {
    # Once-for-All's MobileNetV3 space (Cai et al. 2020) for 128-224 px RGB: a stride-2 stem of 16
    # (hard-swish), a first stage of one 16-channel block, then stages of up to 4 blocks at widths
    # 24/40/80/112/160 with strides 2/2/2/1/2; ReLU in the first stages, hard-swish after; squeeze-
    # excite (hard-sigmoid gate) in the 40, 112 and 160 stages; the last 1x1 conv to 960 (hard-swish).
    "mbv3-224": {"stem": 16, "stem_stride": 2, "stages": [[16, 1, 1], [24, 4, 2], [40, 4, 2], [80, 4, 2], [112, 4, 1],
                                                          [160, 4, 2]],
                 "kernels": [3, 5, 7], "expands": [3, 4, 6], "widths": [0.5, 0.75, 1.0], "se": [False, True],
                 "input_size": 224, "in_channels": 3, "head": 960, "resolutions": [128, 160, 192, 224],
                 "min_depth": 2, "acts": ["relu", "relu", "relu", "hswish", "hswish", "hswish"], "stem_act": "hswish",
                 "head_act": "hswish", "se_gate": "hsigmoid", "stage_se": [False, False, True, False, True, True]},
}


def preset(name: str) -> dict[str, Any]:
    """The named preset's fields (a copy); an unknown name lists the known ones."""
    if name not in SPACES:
        raise HeteroError(f"unknown search space {name!r}; the presets are {', '.join(sorted(SPACES))} "
                          "(or pass a JSON file of search-space fields)")
    return json.loads(json.dumps(SPACES[name]))


def space_fields(space: str | dict[str, Any]) -> dict[str, Any]:
    """Search-space fields from a preset's name, or from a dict of fields (a ``"preset"`` key in it
    starts from that preset and the other keys change it)."""
    if isinstance(space, str):
        return preset(space)
    if "preset" in space:
        name = space["preset"]
        if not isinstance(name, str):
            raise HeteroError(f"space.preset = {name!r} must name a preset ({', '.join(sorted(SPACES))})")
        return {**preset(name), **{k: v for k, v in space.items() if k != "preset"}}
    return dict(space)


def read_space_arg(text: str) -> dict[str, Any]:
    """``--search-space``: a preset's name (``mbv3-224``) or a JSON file of search-space fields."""
    if text in SPACES:
        return preset(text)
    path = Path(text)
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HeteroError(f"--search-space {text} does not exist and is not a preset ({', '.join(sorted(SPACES))}); "
                          "pass a preset's name or a JSON file of search-space fields") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise HeteroError(f"--search-space {text} is not valid JSON ({e.__class__.__name__}); fix the file") from None
    if not isinstance(d, dict):
        raise HeteroError(f"--search-space {text} must hold a JSON object of search-space fields, got {type(d).__name__}")
    return space_fields(d)


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
    act: str = "relu"  # the expand and depthwise activations
    gate: str = "sigmoid"  # the squeeze-excite gate

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
    resolution: int | None = None  # the input resolution gene; None in a space of fixed input size

    def to_dict(self) -> dict[str, Any]:
        d = {"width": float(self.width), "depths": list(self.depths), "kernels": [list(k) for k in self.kernels],
             "expands": [list(e) for e in self.expands], "se": [list(s) for s in self.se]}
        if self.resolution is not None:
            d["resolution"] = int(self.resolution)
        return d

    def input_size(self, space: SearchSpace) -> int:
        """The subnet's input resolution: its gene, or the space's fixed input size."""
        return space.input_size if self.resolution is None else self.resolution

    @classmethod
    def from_dict(cls, d: Any, space: SearchSpace) -> "Arch":
        """Validate ``d`` against ``space``; a one-line error names the first wrong field. Without a
        ``resolution`` (an arch of a fixed-size space, or written before the gene existed) the arch
        runs at the space's fixed input size, or in an elastic-resolution space at its largest."""
        if isinstance(d, Arch):
            d = d.to_dict()
        if not isinstance(d, dict):
            raise HeteroError(f"an arch must be a JSON object, got {type(d).__name__}; pass the arch.json `hetero search` wrote")
        want = ("width", "depths", "kernels", "expands", "se")
        unknown = sorted(set(d) - set(want) - {"resolution"})
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
        depths = tuple(int(choice(f"depths[{i}]", v, space.depth_choices(i)))
                       for i, v in enumerate(seq("depths", d["depths"], nst, "stage depths")))
        per_slot = {}
        for key, what in (("kernels", "kernel sizes"), ("expands", "expand ratios"), ("se", "squeeze-excite switches")):
            rows = seq(key, d[key], nst, "per-stage lists")
            per_slot[key] = tuple(
                tuple(choice(f"{key}[{i}][{j}]", v, space.choices(key, i))
                      for j, v in enumerate(seq(f"{key}[{i}]", row, space.stages[i][1], what)))
                for i, row in enumerate(rows))
        res = d.get("resolution")
        if res is not None:
            res = int(choice("resolution", res, space.resolution_choices))
        if not space.resolutions:
            res = None  # a fixed-size space's arch: its input size is the space's
        elif res is None:
            res = max(space.resolutions)
        return cls(width=width, depths=depths, resolution=res, **per_slot)

    def check(self, space: SearchSpace) -> "Arch":
        """This arch, validated against ``space`` (raises a one-line HeteroError)."""
        return Arch.from_dict(self.to_dict(), space)

    def key(self) -> str:
        """Canonical JSON of what the subnet computes (inactive slots left out): equal keys, equal nets."""
        blocks = [[[self.kernels[i][j], self.expands[i][j], bool(self.se[i][j])] for j in range(dep)]
                  for i, dep in enumerate(self.depths)]
        d: dict[str, Any] = {"width": float(self.width), "blocks": blocks}
        if self.resolution is not None:
            d["resolution"] = int(self.resolution)
        return json.dumps(d, sort_keys=True, separators=(",", ":"))

    def blocks(self, space: SearchSpace) -> list[Block]:
        """The active blocks, in order, with their channels, kernel, stride and spatial sizes."""
        out: list[Block] = []
        size = conv_out(self.input_size(space), STEM_KERNEL, space.stem_stride)
        cin = space.stem_channels(self.width)
        for i, cout in enumerate(space.stage_channels(self.width)):
            for j in range(self.depths[i]):
                stride = space.stages[i][2] if j == 0 else 1
                k, se = self.kernels[i][j], bool(self.se[i][j])
                mid = mid_channels(cin, self.expands[i][j])
                size_out = conv_out(size, k, stride)
                out.append(Block(i, j, cin, mid, cout, k, stride, se, se_hidden(mid) if se else 0, size, size_out,
                                 space.act(i), space.se_gate))
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


def _build(space: SearchSpace, width: float, depths: list[int], genes: dict[str, dict[tuple[int, int], Any]],
           resolution: int | None = None) -> Arch:
    per = {key: tuple(tuple(genes[key][(i, j)] for j in range(space.stages[i][1])) for i in range(len(space.stages)))
           for key in _GENES}
    return Arch(width=float(width), depths=tuple(depths), resolution=resolution if space.resolutions else None, **per)


def _depth(space: SearchSpace, stage: int, rng: random.Random) -> int:
    choices = space.depth_choices(stage)
    return rng.randint(choices[0], choices[-1])


def sample(space: SearchSpace, rng: random.Random, width: float | None = None) -> Arch:
    """A uniformly random arch (each gene drawn independently), reproducible from ``rng``; ``width``
    fixes the width multiplier instead of drawing it."""
    width = rng.choice(space.widths) if width is None else width
    depths = [_depth(space, i, rng) for i in range(len(space.stages))]
    genes = {key: {s: rng.choice(space.choices(key, s[0])) for s in _slots(space)} for key in _GENES}
    res = rng.choice(space.resolution_choices) if space.resolutions else None  # drawn last: fixed spaces draw as before
    return _build(space, width, depths, genes, res)


def largest(space: SearchSpace) -> Arch:
    genes = {key: {s: max(space.choices(key, s[0])) for s in _slots(space)} for key in _GENES}
    return _build(space, space.max_width, [d for _, d, _ in space.stages], genes, max(space.resolution_choices))


def smallest(space: SearchSpace, width: float | None = None) -> Arch:
    """The cheapest arch, at the narrowest width (or at ``width``) and the lowest resolution."""
    genes = {key: {s: min(space.choices(key, s[0])) for s in _slots(space)} for key in _GENES}
    return _build(space, min(space.widths) if width is None else width,
                  [space.depth_choices(i)[0] for i in range(len(space.stages))], genes, min(space.resolution_choices))


def _genes(arch: Arch, space: SearchSpace) -> dict[str, dict[tuple[int, int], Any]]:
    return {key: {(i, j): getattr(arch, key)[i][j] for i, j in _slots(space)} for key in _GENES}


def mutate(arch: Arch, space: SearchSpace, rng: random.Random, prob: float = 0.1) -> Arch:
    """Redraw each gene (width, every depth, every slot's kernel/expand/SE, the resolution) with probability ``prob``."""
    width = rng.choice(space.widths) if rng.random() < prob else arch.width
    depths = [_depth(space, i, rng) if rng.random() < prob else arch.depths[i] for i in range(len(space.stages))]
    genes = _genes(arch, space)
    for key in _GENES:
        for s in _slots(space):
            if rng.random() < prob:
                genes[key][s] = rng.choice(space.choices(key, s[0]))
    res = arch.resolution
    if space.resolutions and rng.random() < prob:
        res = rng.choice(space.resolution_choices)
    return _build(space, width, depths, genes, res)


def crossover(a: Arch, b: Arch, space: SearchSpace, rng: random.Random) -> Arch:
    """Per-gene uniform crossover: every gene comes from ``a`` or ``b`` with equal chance."""
    width = a.width if rng.random() < 0.5 else b.width
    depths = [a.depths[i] if rng.random() < 0.5 else b.depths[i] for i in range(len(space.stages))]
    ga, gb = _genes(a, space), _genes(b, space)
    genes = {key: {s: ga[key][s] if rng.random() < 0.5 else gb[key][s] for s in _slots(space)} for key in _GENES}
    res = a.resolution
    if space.resolutions:
        res = a.resolution if rng.random() < 0.5 else b.resolution
    return _build(space, width, depths, genes, res)
