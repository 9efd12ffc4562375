"""A real dataset and a small model that ship with the package: nothing is downloaded at run time.

The data is scikit-learn's bundled ``load_digits`` (1,797 8x8 grey images of the digits 0-9). It is split
once, by a fixed permutation, into 1,437 training and 360 validation images, and standardised with the
training set's per-pixel mean and standard deviation (at least 1 grey level, so a pixel that is almost
always blank in training cannot blow up on a validation image). The model is a small residual MLP whose
hidden blocks are named ``layers.<i>.``, the prefix the angle policy's group inference looks for.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from dynbatch_kernels.extras import import_extra

NUM_FEATURES, NUM_CLASSES = 64, 10


@dataclass(frozen=True)
class Dataset:
    """Standardised features ``[N, 64]`` float32 and labels ``[N]`` int64, train and validation."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor

    def to(self, device: torch.device | str) -> Dataset:
        return Dataset(*(t.to(device) for t in (self.x_train, self.y_train, self.x_val, self.y_val)))


def load_digits_split(val_fraction: float = 0.2, split_seed: int = 0) -> Dataset:
    """The digits, split by a permutation fixed by ``split_seed`` and standardised by training statistics."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction: expected a value in (0, 1), got {val_fraction}")
    digits = import_extra("sklearn.datasets", "demo").load_digits()
    x = torch.as_tensor(digits.data, dtype=torch.float32)
    y = torch.as_tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(split_seed))
    num_val = round(val_fraction * len(y))
    val, train = order[:num_val], order[num_val:]
    mean, std = x[train].mean(0), x[train].std(0).clamp_min(1.0)  # rare pixels: no blow-up on val
    x = (x - mean) / std
    return Dataset(x[train], y[train], x[val], y[val])


class Block(nn.Module):
    """``x + W2 relu(W1 x)``: a residual MLP block."""

    def __init__(self, width: int):
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))


class DigitsMLP(nn.Module):
    """``inp`` (64 -> width), ``depth`` residual blocks ``layers.<i>``, ``head`` (width -> 10)."""

    def __init__(self, width: int = 64, depth: int = 2):
        super().__init__()
        if width <= 0 or depth < 0:
            raise ValueError(f"width, depth: expected a positive width and depth >= 0, got {width}, {depth}")
        self.inp = nn.Linear(NUM_FEATURES, width)
        self.layers = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Linear(width, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.inp(x))
        for block in self.layers:
            x = torch.relu(block(x))
        return self.head(x)


def micro_batches(
    x: torch.Tensor, y: torch.Tensor, size: int, generator: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One shuffled epoch of ``(x, y)`` micro-batches of ``size`` rows (the last one may be smaller)."""
    if size <= 0:
        raise ValueError(f"size: expected a positive micro-batch size, got {size}")
    order = torch.randperm(len(y), generator=generator).to(x.device)
    for start in range(0, len(y), size):
        idx = order[start : start + size]
        yield x[idx], y[idx]


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``(x, y)`` (one host read, for logging)."""
    logits = model(x)
    loss = nn.functional.cross_entropy(logits, y)
    acc = (logits.argmax(1) == y).float().mean()
    return tuple(torch.stack([loss, acc]).tolist())
