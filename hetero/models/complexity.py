"""Model complexity: parameters and FLOPs (torch's own flop counter; 1 multiply-add = 2 FLOPs)."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """FLOPs of one forward pass on a single input of shape ``input_shape`` (C, H, W)."""
    was_training = model.training
    model.eval()
    x = torch.zeros((1, *input_shape))
    with FlopCounterMode(display=False) as counter:
        model(x)
    model.train(was_training)
    return int(counter.get_total_flops())
