"""GradientAccumulator as a drop-in: torch.optim semantics in an ordinary loop, each against plain torch.

The reference is torch's own accumulation loop: ``(loss_k * n_k / N).backward()`` per micro-batch, then
``optimizer.step()`` and ``zero_grad()`` (set_to_none) — with ``GradScaler``, ``clip_grad_norm_`` and LR
schedulers where the case has them.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from synthetic import one_thread  # noqa: F401  (an autouse fixture)
from torch import nn

from dynbatch_kernels import FlatLayout
from dynbatch_kernels.batching import FixedPolicy, GradientAccumulator, LinearRule
from dynbatch_kernels.batching.accumulator import HISTORY_SIZE
from dynbatch_kernels.optim import FusedLAMB

SIZES = [8, 5, 11]  # one step: 24 samples in three micro-batches


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def batches(step: int, sizes: list[int] = SIZES) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(step)
    return [(torch.randn(n, 6, generator=gen), torch.randint(0, 3, (n,), generator=gen)) for n in sizes]


def loss_of(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(xb), yb)


def torch_step(model, opt, micro, scaler=None, max_norm=None) -> float | None:
    """torch's accumulation loop for one step; returns clip_grad_norm_'s norm when clipping."""
    total = sum(len(yb) for _, yb in micro)
    for xb, yb in micro:
        loss = loss_of(model, xb, yb) * len(yb) / total
        (loss if scaler is None else scaler.scale(loss)).backward()
    norm = None
    if scaler is not None:
        scaler.unscale_(opt)
    if max_norm is not None:
        norm = nn.utils.clip_grad_norm_(model.parameters(), max_norm).item()
    if scaler is None:
        opt.step()
    else:
        scaler.step(opt)
        scaler.update()
    opt.zero_grad()
    return norm


def acc_step(acc, model, micro, scaler=None, before_backward=None):
    """The accumulator's loop for one step (the policy fires on the last micro-batch)."""
    fired = []
    for xb, yb in micro:
        if before_backward is not None:
            before_backward()
        loss = loss_of(model, xb, yb)
        (loss if scaler is None else scaler.scale(loss)).backward()
        fired.append(acc.accumulate(len(yb), loss.detach()))
    assert fired[-1] and not any(fired[:-1])
    return acc.step()


def assert_same_params(model, reference, rtol=1e-5, atol=1e-7):
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol)


# -- GradScaler, clipping --------------------------------------------------------------------------------


@pytest.mark.parametrize("lag", [0, 1])
def test_grad_scaler_with_plain_sgd_equals_torch(lag):
    """Scaled losses, a plain SGD: the unscaled result, and the scale evolves as torch's GradScaler."""
    model = mlp()
    reference = copy.deepcopy(model)
    kwargs = {"init_scale": 2.0**16, "growth_interval": 2}
    scaler, ref_scaler = torch.amp.GradScaler("cpu", **kwargs), torch.amp.GradScaler("cpu", **kwargs)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    acc = GradientAccumulator(opt, FixedPolicy(24), scaler=scaler, read_lag=lag)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    for step in range(5):
        record = acc_step(acc, model, batches(step), scaler=scaler)
        torch_step(reference, ref_opt, batches(step), scaler=ref_scaler)
        assert scaler.get_scale() == ref_scaler.get_scale()
        assert math.isfinite(record.trace) and record.grad_norm < 10  # unscaled sums
    assert scaler.get_scale() == 2.0**18  # grown after steps 2 and 4
    assert_same_params(model, reference)


def test_scaled_and_unscaled_records_agree():
    """Policies and records see the unscaled sums: same angles and estimates as without a scaler."""
    runs = []
    for scaler in (torch.amp.GradScaler("cpu", init_scale=2.0**20), None):
        model = mlp()
        acc = GradientAccumulator(torch.optim.SGD(model.parameters(), lr=0.1), FixedPolicy(24), scaler=scaler)
        runs.append([acc_step(acc, model, batches(step), scaler=scaler) for step in range(3)])
    for scaled, plain in zip(*runs):
        assert scaled.angles == pytest.approx(plain.angles, rel=1e-6)
        for name in ("trace", "grad_sq", "noise_scale", "grad_norm", "loss"):
            assert getattr(scaled, name) == pytest.approx(getattr(plain, name), rel=1e-5)


@pytest.mark.parametrize("lag", [0, 1])
def test_overflowing_micro_batch_is_dropped_and_the_scale_backs_off(lag):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    model, clean = mlp(), mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = GradientAccumulator(opt, FixedPolicy(19), scaler=scaler, read_lag=lag)
    clean_acc = GradientAccumulator(torch.optim.SGD(clean.parameters(), lr=0.1), FixedPolicy(19))
    micro = batches(0)
    for k, (xb, yb) in enumerate(micro):
        loss = loss_of(model, xb, yb)
        scaler.scale(loss * (math.inf if k == 1 else 1.0)).backward()  # micro-batch 2 overflows
        acc.accumulate(len(yb), loss.detach())
    record = acc.step()
    acc_step(clean_acc, clean, [micro[0], micro[2]])
    assert record.nonfinite == 1 and record.samples == 19 and record.applied
    assert scaler.get_scale() == 2.0**9 and scaler._get_growth_tracker() == 0  # GradScaler.update on inf
    assert_same_params(model, clean, rtol=1e-6, atol=1e-8)
    acc_step(acc, model, [micro[0], micro[2]], scaler=scaler)
    assert scaler.get_scale() == 2.0**10  # a clean step grows it again (growth_interval=1)


OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.5, momentum=0.9),  # A scaled in place
    "adamw-fused": lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True),  # folded into grad_scale
    "fused-lamb": lambda ps: FusedLAMB(ps, lr=1e-2),  # folded into grad_scale
}


@pytest.mark.parametrize("scaled", [False, True], ids=["unscaled", "scaler"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_max_grad_norm_equals_clip_grad_norm(name, scaled):
    model = mlp()
    reference = copy.deepcopy(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12) if scaled else None
    ref_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12) if scaled else None
    max_norm = 0.3
    acc = GradientAccumulator(
        OPTIMIZERS[name](model.parameters()), FixedPolicy(24), scaler=scaler, max_grad_norm=max_norm
    )
    ref_opt = OPTIMIZERS[name](reference.parameters())
    clipped = 0
    for step in range(4):
        record = acc_step(acc, model, batches(step), scaler=scaler)
        norm = torch_step(reference, ref_opt, batches(step), scaler=ref_scaler, max_norm=max_norm)
        assert record.grad_norm == pytest.approx(norm, rel=1e-5)
        clipped += norm > max_norm
    assert clipped >= 2, "clipping never active: a weak test"
    assert_same_params(model, reference)


# -- LR schedulers ---------------------------------------------------------------------------------------


def test_lr_rule_multiplies_a_warmup_schedule():
    model = mlp()
    reference = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    scheduler = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.25, total_iters=3)
    acc = GradientAccumulator(opt, FixedPolicy(24), LinearRule(batch_ref=12))  # factor 2
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.2)
    for step in range(5):
        scheduled = scheduler.get_last_lr()[0]
        record = acc_step(acc, model, batches(step))
        assert record.lr == pytest.approx(2 * scheduled)
        assert opt.param_groups[0]["lr"] == scheduled  # the scheduler's value, restored
        if record.applied:
            scheduler.step()
        ref_opt.param_groups[0]["lr"] = 2 * scheduled
        torch_step(reference, ref_opt, batches(step))
    assert [r.lr for r in acc.history] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.4])
    assert_same_params(model, reference)


def test_chained_exponential_schedule_does_not_compound_the_factor():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5)
    acc = GradientAccumulator(opt, FixedPolicy(24), LinearRule(batch_ref=8))  # factor 3
    for step in range(4):
        record = acc_step(acc, model, batches(step))
        scheduler.step()
        assert record.lr == pytest.approx(0.3 * 0.5**step)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**4)


def test_tensor_lr_is_scaled_and_restored_in_place():
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=torch.tensor(0.01), fused=True)
    lr = opt.param_groups[0]["lr"]
    acc = GradientAccumulator(opt, FixedPolicy(24), LinearRule(batch_ref=6))  # factor 4
    record = acc_step(acc, model, batches(0))
    assert record.lr == pytest.approx(0.04)
    assert opt.param_groups[0]["lr"] is lr and lr.item() == pytest.approx(0.01)


# -- which parameters, and p.grad ------------------------------------------------------------------------


def adamw(params):
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.5)


DECAYING = {"adamw": adamw, "fused-lamb": lambda ps: FusedLAMB(ps, lr=1e-2, weight_decay=0.5)}


@pytest.mark.parametrize("name", DECAYING)
def test_frozen_parameter(name):
    model = mlp()
    model[0].weight.requires_grad_(False)
    reference = copy.deepcopy(model)
    frozen = model[0].weight.detach().clone()
    acc = GradientAccumulator(DECAYING[name](model.parameters()), FixedPolicy(24))
    ref_opt = DECAYING[name](reference.parameters())
    for step in range(3):
        acc_step(acc, model, batches(step))
        torch_step(reference, ref_opt, batches(step))
    assert torch.equal(model[0].weight, frozen) and model[0].weight.grad is None
    assert_same_params(model, reference)


class Branchy(nn.Module):
    """Two heads; ``use_b`` picks whether the second one takes part in the forward."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body, self.a, self.b = nn.Linear(6, 5), nn.Linear(5, 3), nn.Linear(5, 3)
        self.use_b = True

    def forward(self, x):
        h = torch.tanh(self.body(x))
        return self.a(h) + self.b(h) if self.use_b else self.a(h)


@pytest.mark.parametrize("name", DECAYING)
def test_parameter_reached_by_no_micro_batch_is_skipped(name):
    """Weight decay and momentum: a head that no micro-batch of the step used does not move."""
    model = Branchy()
    reference = copy.deepcopy(model)
    acc = GradientAccumulator(DECAYING[name](model.parameters()), FixedPolicy(24))
    ref_opt = DECAYING[name](reference.parameters())
    for step, use_b in enumerate([True, False, False, True]):
        model.use_b = reference.use_b = use_b
        before = model.b.weight.detach().clone()
        acc_step(acc, model, batches(step))
        torch_step(reference, ref_opt, batches(step))
        assert torch.equal(model.b.weight, before) != use_b
    assert_same_params(model, reference)


def test_parameter_reached_by_some_micro_batches_counts_them():
    model = Branchy()
    reference = copy.deepcopy(model)
    acc = GradientAccumulator(adamw(model.parameters()), FixedPolicy(24))
    ref_opt = adamw(reference.parameters())
    for m in (model, reference):
        m.use_b = False
    micro = batches(0)
    total = sum(len(yb) for _, yb in micro)
    for k, (xb, yb) in enumerate(micro):
        model.use_b = reference.use_b = k == 1
        loss = loss_of(model, xb, yb)
        loss.backward()
        acc.accumulate(len(yb), loss.detach())
        (loss_of(reference, xb, yb) * len(yb) / total).backward()
    acc.step()
    ref_opt.step()
    assert_same_params(model, reference)


def set_to_none(model):
    return lambda: model.zero_grad(set_to_none=True)


GRAD_MODES = ["views", "set_to_none", "assigned"]


@pytest.mark.parametrize("mode", GRAD_MODES)
def test_gradients_replaced_or_cleared_by_the_user(mode):
    """``p.grad`` left as the accumulator's views, set to None before every backward, or assigned."""
    model = mlp()
    reference = copy.deepcopy(model)
    acc = GradientAccumulator(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), FixedPolicy(24))
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    for step in range(3):
        for xb, yb in batches(step):
            if mode == "set_to_none":
                model.zero_grad(set_to_none=True)
            loss = loss_of(model, xb, yb)
            if mode == "assigned":  # a closure computing its own gradients
                for p, g in zip(model.parameters(), torch.autograd.grad(loss, list(model.parameters()))):
                    p.grad = g
            else:
                loss.backward()
            fired = acc.accumulate(len(yb), loss.detach())
        assert fired
        acc.step()
        torch_step(reference, ref_opt, batches(step))
    assert_same_params(model, reference)


class Recording(torch.optim.SGD):
    """SGD that keeps a copy of every ``p.grad`` it is handed."""

    def step(self, closure=None):
        self.seen = [None if p.grad is None else p.grad.clone() for p in self.param_groups[0]["params"]]
        return super().step(closure)


def test_optimizer_finds_the_averaged_gradient_in_p_grad():
    model = mlp()
    reference = copy.deepcopy(model)
    opt = Recording(model.parameters(), lr=0.1)
    acc = GradientAccumulator(opt, FixedPolicy(24))
    micro = batches(0)
    for xb, yb in micro:
        loss = loss_of(model, xb, yb)
        loss.backward()
        acc.accumulate(len(yb), loss.detach())
        assert all((p.grad == 0).all() for p in model.parameters())  # taken, p.grad zeroed
    acc.step()
    total = sum(len(yb) for _, yb in micro)
    for xb, yb in micro:
        (loss_of(reference, xb, yb) * len(yb) / total).backward()
    for seen, p in zip(opt.seen, reference.parameters()):
        torch.testing.assert_close(seen, p.grad, rtol=1e-5, atol=1e-8)
    assert all((p.grad == 0).all() for p in model.parameters())  # zeroed views for the next backward


# -- the optimizer's parameters change -------------------------------------------------------------------


@pytest.mark.parametrize("at", ["boundary", "mid-step"])
def test_add_param_group_unfreezing_a_layer(at):
    """Progressive unfreezing: the head joins the optimizer later, at a step boundary or mid-step."""
    model = mlp()
    model[2].requires_grad_(False)
    reference = copy.deepcopy(model)
    acc = GradientAccumulator(adamw(model[0].parameters()), FixedPolicy(24))
    ref_opt = adamw(reference[0].parameters())
    when = (1, 0) if at == "boundary" else (1, 1)  # (step, before micro-batch k)
    for step in range(3):
        micro = batches(step)
        total = sum(len(yb) for _, yb in micro)
        for k, (xb, yb) in enumerate(micro):
            if (step, k) == when:
                for m, o in ((model, acc.optimizer), (reference, ref_opt)):
                    m[2].requires_grad_(True)
                    o.add_param_group({"params": list(m[2].parameters()), "lr": 3e-2})
            loss = loss_of(model, xb, yb)
            loss.backward()
            acc.accumulate(len(yb), loss.detach())
            (loss_of(reference, xb, yb) * len(yb) / total).backward()
        acc.step()
        ref_opt.step()
        ref_opt.zero_grad()
    assert_same_params(model, reference)
    assert len(acc.layout.params) == 4


def test_follows_a_replaced_optimizer_layout():
    """An optimizer with its own (bind=False) layout that it replaces after add_param_group."""
    model = mlp()
    reference = copy.deepcopy(model)
    opt = torch.optim.SGD(model[0].parameters(), lr=0.1)
    opt.layout = FlatLayout(model[0].named_parameters(), bind=False)
    acc = GradientAccumulator(opt, FixedPolicy(24))
    assert acc.layout is opt.layout
    ref_opt = torch.optim.SGD(reference[0].parameters(), lr=0.1)
    for step in range(3):
        if step == 1:
            for m, o in ((model, opt), (reference, ref_opt)):
                m[2].zero_grad()  # what step 0's backward left there, outside any optimizer
                o.add_param_group({"params": list(m[2].parameters())})
            opt.layout = FlatLayout(opt.param_groups, bind=False)
        acc_step(acc, model, batches(step))
        torch_step(reference, ref_opt, batches(step))
        assert acc.layout is opt.layout
    assert_same_params(model, reference)


# -- history ---------------------------------------------------------------------------------------------


def test_history_is_bounded_and_resumes():
    model = mlp()
    acc = GradientAccumulator(torch.optim.SGD(model.parameters(), lr=0.1), FixedPolicy(24), history_size=3)
    for step in range(5):
        acc_step(acc, model, batches(step))
    assert [r.step for r in acc.history] == [2, 3, 4] and acc.steps == 5
    state = acc.state_dict()
    other = GradientAccumulator(torch.optim.SGD(mlp().parameters(), lr=0.1), FixedPolicy(24), history_size=3)
    other.load_state_dict(state)
    assert list(other.history) == list(acc.history) and other.steps == 5
    assert (
        GradientAccumulator(torch.optim.SGD(mlp().parameters()), FixedPolicy(8)).history.maxlen
        == HISTORY_SIZE
    )
    unbounded = GradientAccumulator(torch.optim.SGD(mlp().parameters()), FixedPolicy(8), history_size=None)
    assert unbounded.history.maxlen is None
    with pytest.raises(ValueError, match="history_size"):
        GradientAccumulator(torch.optim.SGD(mlp().parameters()), FixedPolicy(8), history_size=0)
