"""Exponential moving average of a model's weights, as a small reusable piece."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """Keeps a frozen copy of `model` whose weights follow ema = decay * ema + (1 - decay) * weights.

    Warm-up: the effective decay is min(decay, (1 + n) / (10 + n)) after n updates, so early
    averages are not dominated by the random initial weights.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.model = copy.deepcopy(unwrap(model)).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        live = unwrap(model).state_dict()
        for name, averaged in self.model.state_dict().items():
            if averaged.dtype.is_floating_point:
                averaged.lerp_(live[name].to(averaged.dtype), 1.0 - decay)
            else:
                averaged.copy_(live[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor], updates: int) -> None:
        self.model.load_state_dict(state)
        self.updates = updates


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module behind DDP / torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)
