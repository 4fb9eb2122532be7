"""What the toy stack's training loops share: the learning-rate schedule and the logged loss."""

from __future__ import annotations

import math

import torch


def warmup_cosine(optimizer: torch.optim.Optimizer, steps: int, warmup: int, floor: float = 0.0):
    """Linear warmup over ``warmup`` steps, then cosine decay from the base rate to ``floor`` times it at ``steps``."""
    scale = 0.5 - floor / 2
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * (floor + scale * (1 + math.cos(math.pi * min(1.0, s / steps)))))


class LossLog:
    """The mean loss of every ``every`` steps (and of the last, shorter stretch), as plain floats."""

    def __init__(self, steps: int, every: int = 50):
        self.steps, self.every, self.means, self._sum, self._count = steps, every, [], 0.0, 0

    def add(self, step: int, loss: torch.Tensor) -> None:
        self._sum += loss.item()
        self._count += 1
        if (step + 1) % self.every == 0 or step + 1 == self.steps:
            self.means.append(self._sum / self._count)
            self._sum, self._count = 0.0, 0

    def state(self) -> dict:
        """What `restore` needs to go on logging exactly as if never stopped (plain, JSON-able)."""
        return {"means": list(self.means), "sum": self._sum, "count": self._count}

    def restore(self, state: dict) -> None:
        self.means, self._sum, self._count = list(state["means"]), state["sum"], state["count"]
