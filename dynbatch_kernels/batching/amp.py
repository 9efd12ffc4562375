"""``torch.amp.GradScaler`` under the accumulator: it reads the loss scale and updates it itself.

The user scales every micro-batch loss (``scaler.scale(loss).backward()``); the accumulator never calls
``scaler.step`` (which would unscale in an extra pass and read ``found_inf`` on the host) but folds
``1 / scale`` into its own division and, after each step, updates the scale exactly as
``GradScaler.update`` does: ``scale *= backoff_factor`` (and the growth count restarts) when a micro-batch
of the step overflowed, else one more good step towards ``scale *= growth_factor`` every
``growth_interval`` steps. The scale therefore stays constant within a step.
"""

from __future__ import annotations

import torch


def loss_scale(scaler: torch.amp.GradScaler) -> torch.Tensor:
    """The current scale: a 0-dim float32 tensor on the scaler's device (no host read)."""
    scale = scaler._scale
    if scale is None:
        raise RuntimeError(
            "scaler: expected scaler.scale(loss).backward() before accumulate(), got a scaler that has "
            "scaled nothing yet"
        )
    return scale


def update_scale(scaler: torch.amp.GradScaler, found_inf: bool) -> None:
    """``GradScaler.update()`` for a step that found (``found_inf``) or did not find a non-finite gradient."""
    scale = loss_scale(scaler)
    torch._amp_update_scale_(
        scale,
        scaler._growth_tracker,
        torch.full((), float(found_inf), dtype=torch.float32, device=scale.device),
        scaler.get_growth_factor(),
        scaler.get_backoff_factor(),
        scaler.get_growth_interval(),
    )
