"""ExtrapSGD's local mode against its extrapolation lr on the LM workload.

``python -m benchmarks.extrap_gamma``: a follow-up to :mod:`benchmarks.lm_experiment`, where the local
mode with ``extrapolation_lr = lr = 0.1`` diverged. A smaller TinyGPT (width 32, 2 layers, context 64),
60 steps of 4 micro-batches of 16 windows, lr 0.1, momentum 0.9 (Nesterov), seed 0. Prints the validation
bits/byte (on 4 micro-batches drawn after training) of ``torch.optim.SGD`` with Nesterov momentum and of
``ExtrapSGD(mode="local")`` for each ``extrapolation_lr``; ``extrapolation_lr=0`` is the same algorithm
as the Nesterov run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch

from benchmarks.lm_corpus import CACHE, load_corpus
from benchmarks.lm_experiment import windows
from benchmarks.lm_model import TinyGPT, lm_loss
from dynbatch_kernels.optim import ExtrapSGD

CONTEXT, WIDTH, LAYERS, HEADS = 64, 32, 2, 4
STEPS, PER_STEP, LR = 60, 4, 0.1
GAMMAS = (0.0, 0.01, 0.05, 0.1)


def final_bits_per_byte(make: Callable, local: bool, train: torch.Tensor) -> float:
    torch.manual_seed(0)
    model = TinyGPT(CONTEXT, WIDTH, LAYERS, HEADS)
    opt = make(model.parameters())
    stream: Iterator[torch.Tensor] = windows(train, CONTEXT, torch.Generator().manual_seed(1))
    for _ in range(STEPS):
        group = [next(stream) for _ in range(PER_STEP)]
        if local:  # the gradient at w, then the extrapolation to u
            for xb in group:
                (lm_loss(model, xb) / PER_STEP).backward()
            opt.extrapolate()
        for xb in group:
            (lm_loss(model, xb) / PER_STEP).backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        return sum(lm_loss(model, next(stream)).item() for _ in range(4)) / 4 / math.log(2)


def main() -> None:
    torch.set_num_threads(1)
    train = load_corpus(CACHE).train
    nesterov = final_bits_per_byte(
        lambda p: torch.optim.SGD(p, lr=LR, momentum=0.9, nesterov=True), False, train
    )
    print(f"Nesterov SGD lr {LR}: {nesterov:.3f} bits/byte")
    for gamma in GAMMAS:
        got = final_bits_per_byte(lambda p, g=gamma: ExtrapSGD(p, lr=LR, extrapolation_lr=g), True, train)
        print(f"ExtrapSGD local, extrapolation_lr {gamma}: {got:.3f} bits/byte")


if __name__ == "__main__":
    main()
