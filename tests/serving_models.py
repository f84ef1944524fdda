"""Models for the serving tests, importable by path (``laplacefim serve --model``)."""

from __future__ import annotations

import time

import torch
from torch import Tensor, nn

# An input whose first value is POISON makes the model raise; SLOW makes it sleep.
POISON = 1234.0
SLOW = 777.0
SLOW_SECONDS = 1.5


class GuardedMLP(nn.Module):
    """A small MLP for 8 features and 3 classes that fails or stalls on marked inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))

    def forward(self, x: Tensor) -> Tensor:
        if bool((x[:, 0] == POISON).any()):
            raise RuntimeError("poisoned input")
        if bool((x[:, 0] == SLOW).any()):
            time.sleep(SLOW_SECONDS)
        return self.net(x)


def make_guarded() -> nn.Module:
    """The factory ``laplacefim serve`` calls."""
    return GuardedMLP()


class BagOfTokens(nn.Module):
    """Token ids and a mask (HuggingFace-style keyword inputs) to 2 logits."""

    def __init__(self, vocab: int = 20, dim: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, 2)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        mask = attention_mask.to(self.embed.weight.dtype)[..., None]
        pooled = (self.embed(input_ids) * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return self.head(torch.tanh(pooled))


def make_bag() -> nn.Module:
    """The factory of :class:`BagOfTokens`."""
    return BagOfTokens()
