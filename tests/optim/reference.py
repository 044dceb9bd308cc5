"""The reference ``master_weights`` is measured against (tests and ``benchmarks/bench_precision.py``)."""

from __future__ import annotations

from collections.abc import Callable

import torch


class ClassicMixedPrecision:
    """Classic mixed precision: a separate fp32 master per weight, ``make_opt(masters)`` steps the masters,
    the model's weights are their round-to-nearest copy after each step."""

    def __init__(self, model: torch.nn.Module,
                 make_opt: Callable[[list[torch.Tensor]], torch.optim.Optimizer]) -> None:
        self.params = list(model.parameters())
        self.masters = [p.detach().float().clone().requires_grad_() for p in self.params]
        self.opt = make_opt(self.masters)

    @torch.no_grad()
    def step(self) -> None:
        for m, p in zip(self.masters, self.params, strict=True):
            m.grad = p.grad.float()
        self.opt.step()
        for m, p in zip(self.masters, self.params, strict=True):
            p.copy_(m)
