"""The elastic MobileNetV3-style supernet (Once-for-All, Cai et al. 2020), as CMP-NAS trains it.

Every subnet computes with slices of the same parameters: leading channel slices for width and
expand ratio (batch-norm affine parameters and running statistics sliced alike), the centre of the
largest depthwise kernel for smaller kernels (optionally through OFA's learned kernel
transformation matrices), the first ``depth`` blocks of each stage, and the leading input
features of the projection. In a space with elastic resolution the input is resized (bilinear,
antialiased) to the active subnet's resolution, as OFA trains. ``extract`` copies the active slices into a static ``nas_mbv3``
network; ``arch_flops``/``arch_params`` count that network analytically.
"""
from __future__ import annotations

import random
from dataclasses import replace
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from hetero.errors import HeteroError
from hetero.models.embedding import EmbeddingModel
from hetero.nas.space import STEM_KERNEL, Arch, Block, SearchSpace, largest, mid_channels, se_hidden
from hetero.nas.space import sample as sample_arch
from hetero.nas.subnet import NasMobileNetV3

_ACT = {"relu": F.relu, "hswish": F.hardswish}
_GATE = {"sigmoid": torch.sigmoid, "hsigmoid": F.hardsigmoid}


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """A batch at ``size`` x ``size`` (bilinear, antialiased when shrinking: OFA's elastic resolution);
    itself when it is that size already."""
    if tuple(x.shape[-2:]) == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


class ElasticBatchNorm2d(nn.BatchNorm2d):
    """Batch norm over the leading ``x.shape[1]`` channels of the largest layer's parameters and statistics."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        factor = 0.0
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch_stats = self.training or self.running_mean is None
        # Slices are views: running statistics update in place, only for the active channels.
        return F.batch_norm(x, self.running_mean[:c] if self.running_mean is not None else None,
                            self.running_var[:c] if self.running_var is not None else None,
                            self.weight[:c], self.bias[:c], use_batch_stats, factor, self.eps)

    def state_slice(self, c: int) -> dict[str, torch.Tensor]:
        return {"weight": self.weight[:c], "bias": self.bias[:c], "running_mean": self.running_mean[:c],
                "running_var": self.running_var[:c], "num_batches_tracked": self.num_batches_tracked}


class ElasticBlock(nn.Module):
    """One block slot at its largest; ``forward(x, block)`` runs the slice ``block`` describes."""

    def __init__(self, cin: int, cout: int, stride: int, space: SearchSpace):
        super().__init__()
        kmax = space.max_kernel
        mid = mid_channels(cin, max(space.expands))
        self.expand = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = ElasticBatchNorm2d(mid)
        self.dw = nn.Conv2d(mid, mid, kmax, stride, kmax // 2, groups=mid, bias=False)
        self.bn2 = ElasticBatchNorm2d(mid)
        if True in space.se or True in space.stage_se:
            hidden = se_hidden(mid)
            self.se_fc1 = nn.Conv2d(mid, hidden, 1)
            self.se_fc2 = nn.Conv2d(hidden, mid, 1)
        self.project = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn3 = ElasticBatchNorm2d(cout)
        ks = sorted(space.kernels, reverse=True)
        # OFA: a smaller kernel is the centre of the next larger one times a learned (k*k)x(k*k) matrix.
        self.transforms = nn.ParameterDict(
            {f"{a}to{b}": nn.Parameter(torch.eye(b * b)) for a, b in zip(ks, ks[1:])} if space.kernel_transform else {})
        self.kernels = ks

    def dw_weight(self, mid: int, k: int) -> torch.Tensor:
        w = self.dw.weight[:mid]
        if not len(self.transforms):
            s = (w.shape[-1] - k) // 2
            return w[:, :, s:s + k, s:s + k]
        for a, b in zip(self.kernels, self.kernels[1:]):
            if a <= k:
                break
            s = (a - b) // 2
            w = w[:, :, s:s + b, s:s + b].reshape(mid, b * b) @ self.transforms[f"{a}to{b}"].t()
            w = w.reshape(mid, 1, b, b)
        return w

    def forward(self, x: torch.Tensor, b: Block) -> torch.Tensor:
        act = _ACT[b.act]
        y = act(self.bn1(F.conv2d(x, self.expand.weight[:b.mid, :b.cin])))
        y = act(self.bn2(F.conv2d(y, self.dw_weight(b.mid, b.kernel), None, b.stride, b.kernel // 2, 1, b.mid)))
        if b.se:
            s = y.mean((2, 3), keepdim=True)
            s = F.relu(F.conv2d(s, self.se_fc1.weight[:b.hidden, :b.mid], self.se_fc1.bias[:b.hidden]))
            y = y * _GATE[b.gate](F.conv2d(s, self.se_fc2.weight[:b.mid, :b.hidden], self.se_fc2.bias[:b.mid]))
        y = self.bn3(F.conv2d(y, self.project.weight[:b.cout, :b.mid]))
        return x + y if b.residual else y

    def static_state(self, b: Block) -> dict[str, torch.Tensor]:
        """The active slice under the names of :class:`hetero.nas.subnet.InvertedResidual`."""
        st = {"expand.0.weight": self.expand.weight[:b.mid, :b.cin], "dw.0.weight": self.dw_weight(b.mid, b.kernel),
              "project.0.weight": self.project.weight[:b.cout, :b.mid]}
        for prefix, bn, c in (("expand.1.", self.bn1, b.mid), ("dw.1.", self.bn2, b.mid), ("project.1.", self.bn3, b.cout)):
            st.update({prefix + k: v for k, v in bn.state_slice(c).items()})
        if b.se:
            st.update({"se.fc1.weight": self.se_fc1.weight[:b.hidden, :b.mid], "se.fc1.bias": self.se_fc1.bias[:b.hidden],
                       "se.fc2.weight": self.se_fc2.weight[:b.mid, :b.hidden], "se.fc2.bias": self.se_fc2.bias[:b.mid]})
        return st

    @torch.no_grad()
    def sort_channels(self) -> None:
        """Reorder expanded channels by the L1 norm of their expand weights, largest first (OFA's
        channel sorting); the permutation runs through BN, depthwise, SE and project, so the full
        block computes the same function while the leading slices hold the most important channels."""
        order = torch.argsort(self.expand.weight.abs().sum((1, 2, 3)), descending=True, stable=True)
        self.expand.weight.copy_(self.expand.weight[order])
        for bn in (self.bn1, self.bn2):
            for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
                t.copy_(t[order])
        self.dw.weight.copy_(self.dw.weight[order])
        if hasattr(self, "se_fc1"):
            self.se_fc1.weight.copy_(self.se_fc1.weight[:, order])
            self.se_fc2.weight.copy_(self.se_fc2.weight[order])
            self.se_fc2.bias.copy_(self.se_fc2.bias[order])
        self.project.weight.copy_(self.project.weight[:, order])


class Supernet(nn.Module):
    """Elastic MobileNetV3-style supernet; ``forward`` gives the active subnet's unit [N, dim] embeddings."""

    def __init__(self, space: SearchSpace, dim: int, in_channels: int | None = None):
        super().__init__()
        if dim < 2:
            raise HeteroError(f"embedding dim must be >= 2, got {dim}")
        if in_channels is not None and in_channels != space.in_channels:
            space = replace(space, in_channels=in_channels)
        self.space, self.dim = space, dim
        stem = space.stem_channels(space.max_width)
        self.stem = nn.Conv2d(space.in_channels, stem, STEM_KERNEL, space.stem_stride, STEM_KERNEL // 2, bias=False)
        self.stem_bn = ElasticBatchNorm2d(stem)
        self.stages = nn.ModuleList()
        cin = stem
        for (_, depth, stride), cout in zip(space.stages, space.stage_channels(space.max_width)):
            self.stages.append(nn.ModuleList(ElasticBlock(cin if j == 0 else cout, cout, stride if j == 0 else 1, space)
                                             for j in range(depth)))
            cin = cout
        if space.head:
            self.head = nn.Conv2d(cin, space.head, 1, bias=False)
            self.head_bn = ElasticBatchNorm2d(space.head)
            cin = space.head
        self.proj = nn.Linear(cin, dim)
        self.set_active(largest(space))

    @property
    def active(self) -> Arch:
        return self._arch

    def set_active(self, arch: Arch) -> None:
        """Make ``arch`` (validated against the space) the subnet that ``forward`` runs."""
        self._arch = Arch.from_dict(arch, self.space)
        self._blocks = self._arch.blocks(self.space)

    def sample(self, rng: random.Random) -> Arch:
        """Activate a uniformly random subnet and return its arch."""
        arch = sample_arch(self.space, rng)
        self.set_active(arch)
        return arch

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features of the active subnet; the input is first resized to its resolution (if the space has that gene)."""
        sp = self.space
        if sp.resolutions:
            x = resize(x, self._arch.input_size(sp))
        c = sp.stem_channels(self._arch.width)
        x = _ACT[sp.stem_act](self.stem_bn(F.conv2d(x, self.stem.weight[:c], None, sp.stem_stride, STEM_KERNEL // 2)))
        for b in self._blocks:
            x = self.stages[b.stage][b.slot](x, b)
        if sp.head:
            x = _ACT[sp.head_act](self.head_bn(F.conv2d(x, self.head.weight[:, :x.shape[1]])))
        return x.mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        return F.normalize(F.linear(f, self.proj.weight[:, :f.shape[1]], self.proj.bias), dim=1)

    @torch.no_grad()
    def extract(self, arch: Arch | None = None) -> EmbeddingModel:
        """A standalone ``EmbeddingModel`` (backbone ``nas_mbv3``) holding copies of ``arch``'s slices, in eval mode."""
        arch = self._arch if arch is None else Arch.from_dict(arch, self.space)
        backbone = NasMobileNetV3(arch, self.space)
        model = EmbeddingModel(backbone, self.dim)
        c = self.space.stem_channels(arch.width)
        state = {"backbone.stem.0.weight": self.stem.weight[:c]}
        state.update({f"backbone.stem.1.{k}": v for k, v in self.stem_bn.state_slice(c).items()})
        blocks = arch.blocks(self.space)
        for n, b in enumerate(blocks):
            state.update({f"backbone.blocks.{n}.{k}": v for k, v in self.stages[b.stage][b.slot].static_state(b).items()})
        if self.space.head:
            cin = self.space.stage_channels(arch.width)[-1]
            state[f"backbone.blocks.{len(blocks)}.0.weight"] = self.head.weight[:, :cin]
            state.update({f"backbone.blocks.{len(blocks)}.1.{k}": v for k, v in self.head_bn.state_slice(self.space.head).items()})
        state["proj.weight"] = self.proj.weight[:, :backbone.out_features]
        state["proj.bias"] = self.proj.bias
        model.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True)
        return model.to(self.proj.weight.device).eval()

    def sort_channels(self) -> None:
        """Reorder every block's expanded channels by importance (the largest subnet is unchanged)."""
        for stage in self.stages:
            for block in stage:
                block.sort_channels()


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[torch.Tensor]) -> nn.Module:
    """Re-estimate every batch norm's running statistics as the plain average over ``batches``
    (weight-shared BN statistics do not fit any one subnet; OFA recomputes them per subnet).
    Works on a supernet (its active subnet's slices) or any module; leaves the model in eval mode."""
    it = iter(batches)
    try:
        first = next(it)
    except StopIteration:
        raise HeteroError("batch-norm recalibration needs at least one batch of images") from None
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    try:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        model(first.to(device))
        for x in it:
            model(x.to(device))
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        model.eval()
    return model


def _flops_params(arch: Arch, space: SearchSpace, dim: int) -> tuple[int, int]:
    stem = space.stem_channels(arch.width)
    size = (arch.input_size(space) + 2 * (STEM_KERNEL // 2) - STEM_KERNEL) // space.stem_stride + 1
    macs = space.in_channels * stem * STEM_KERNEL**2 * size * size
    params = space.in_channels * stem * STEM_KERNEL**2 + 2 * stem
    for b in arch.blocks(space):
        hw_in, hw_out = b.size_in**2, b.size_out**2
        macs += b.cin * b.mid * hw_in + b.mid * b.kernel**2 * hw_out + b.mid * b.cout * hw_out
        params += b.cin * b.mid + 2 * b.mid + b.mid * b.kernel**2 + 2 * b.mid + b.mid * b.cout + 2 * b.cout
        if b.se:  # two 1x1 convs on the pooled vector; biases are parameters, not counted FLOPs
            macs += 2 * b.mid * b.hidden
            params += 2 * b.mid * b.hidden + b.hidden + b.mid
    if space.head:  # the last 1x1 conv at the last block's resolution
        cin, hw = space.stage_channels(arch.width)[-1], arch.blocks(space)[-1].size_out ** 2
        macs += cin * space.head * hw
        params += cin * space.head + 2 * space.head
    out = arch.out_features(space)
    macs += out * dim
    params += out * dim + dim
    return 2 * macs, params


def arch_flops(arch: Arch, space: SearchSpace, dim: int) -> int:
    """FLOPs of the extracted subnet on one input at its resolution (``arch.input_size(space)``), as
    ``hetero.models.complexity.count_flops`` counts them (convolutions and matmuls, 1 MAC = 2 FLOPs;
    BN, activations, pooling and biases are free)."""
    return _flops_params(arch, space, dim)[0]


def arch_params(arch: Arch, space: SearchSpace, dim: int) -> int:
    """Parameters of the extracted subnet (``hetero.models.complexity.count_params``), without building it."""
    return _flops_params(arch, space, dim)[1]
