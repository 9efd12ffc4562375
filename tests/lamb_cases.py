"""What the LAMB op and optimizer tests share: random options per group and a float64 step-by-step oracle."""

from __future__ import annotations

import math
from typing import Any

import torch

from dynbatch_kernels.backends import backend_name

TRUST_CLIPS = [None, (0.0, 1.0), (0.01, 10.0), (0.5, 0.8)]


def random_options(gen: torch.Generator, **fixed: Any) -> dict[str, Any]:
    """One param group's options, random over every branch (``fixed`` overrides some)."""

    def pick(values: list) -> Any:
        return values[int(torch.randint(len(values), (), generator=gen))]

    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=gen))

    options = {
        "lr": uniform(1e-3, 5e-2),
        "betas": (uniform(0.5, 0.95), uniform(0.9, 0.9995)),
        "eps": pick([1e-8, 1e-6, 1e-3]),
        "weight_decay": pick([0.0, 0.01, 0.1]),
        "trust_clip": pick(TRUST_CLIPS),
        "always_adapt": pick([False, True]),
        "bias_correction": pick([True, False]),
        "max_grad_norm": pick([None, 0.5, 50.0]),
    }
    return {**options, **fixed}


def bf16_rtol(device: str) -> float:
    """Relative bfloat16 rounding error: the Triton interpreter truncates float32 -> bfloat16 (a GPU and the
    other backends round to nearest), so its error bound is one unit in the last place, not a half."""
    interpreted = backend_name(torch.device(device)) == "triton" and torch.device(device).type == "cpu"
    return 2**-7 if interpreted else 2**-8


class Float64Lamb:
    """LAMB / LAMBC as docs/algorithms.md writes it, one tensor at a time in float64."""

    def __init__(self, params: list[torch.Tensor]):
        self.w = [p.detach().double().clone() for p in params]
        self.m = [torch.zeros_like(w) for w in self.w]
        self.v = [torch.zeros_like(w) for w in self.w]
        self.t = [0] * len(self.w)
        self.ratios = [1.0] * len(self.w)

    def step(self, grads: list[torch.Tensor], options: list[dict[str, Any]]) -> None:
        """``grads[i]`` (unscaled) and the options of parameter ``i``'s group, as read at this step."""
        norm = math.sqrt(sum(float(g.double().square().sum()) for g in grads))
        for i, (grad, o) in enumerate(zip(grads, options)):
            g = grad.double()
            if o["max_grad_norm"] is not None:
                g = g / max(1.0, norm / o["max_grad_norm"])
            beta1, beta2 = o["betas"]
            self.t[i] += 1
            self.m[i] = beta1 * self.m[i] + (1 - beta1) * g
            self.v[i] = beta2 * self.v[i] + (1 - beta2) * g * g
            bc1, bc2 = (1 - beta1 ** self.t[i], 1 - beta2 ** self.t[i]) if o["bias_correction"] else (1, 1)
            u = (self.m[i] / bc1) / ((self.v[i] / bc2).sqrt() + o["eps"]) + o["weight_decay"] * self.w[i]
            w_norm, u_norm = float(self.w[i].norm()), float(u.norm())
            ratio = 1.0
            if (o["weight_decay"] != 0 or o["always_adapt"]) and w_norm > 0 and u_norm > 0:
                ratio = w_norm / u_norm
                if o["trust_clip"] is not None:
                    ratio = min(max(ratio, o["trust_clip"][0]), o["trust_clip"][1])
            self.w[i] = self.w[i] - o["lr"] * ratio * u
            self.ratios[i] = ratio
