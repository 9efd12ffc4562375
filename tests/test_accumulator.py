"""GradientAccumulator: averaged steps, any optimizer, bad input, non-finite micro-batches, lag, resume."""

from __future__ import annotations

import copy
import functools
import logging
import math

import pytest
import torch
from synthetic import (
    angle_sequence,
    feed,
    num_elements,
    one_thread,  # noqa: F401  (an autouse fixture)
    tiny_model,
)
from torch import nn

from dynbatch_kernels import FlatLayout
from dynbatch_kernels.batching import (
    AnglePolicy,
    BatchPolicy,
    CABSPolicy,
    FixedPolicy,
    GradientAccumulator,
    LinearRule,
    NoiseScalePolicy,
    SurgeRule,
)
from dynbatch_kernels.data import load_digits_split
from dynbatch_kernels.optim import ExtrapSGD, FusedLAMB


class Never(BatchPolicy):
    """A rule that never fires: only the maximum ends a step."""

    def decide(self, obs) -> bool:
        return False


@functools.cache
def digits():
    return load_digits_split()


def digits_batches(sizes: list[int], seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    data = digits()
    order = torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(seed))
    out, start = [], 0
    for n in sizes:
        idx = order[start : start + n]
        out.append((data.x_train[idx], data.y_train[idx]))
        start += n
    return out


def backward_on(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
    loss = nn.functional.cross_entropy(model(xb), yb)
    loss.backward()
    return loss.detach()


OPTIMIZERS = {
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=False),
    "adamw-fused": lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True),
    "fused-lamb": lambda ps: FusedLAMB(ps, lr=1e-2),  # folds 1/N into its grad_scale
    "extrap-past": lambda ps: ExtrapSGD(ps, lr=0.1, mode="past"),  # owns a layout
}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_steps_equal_full_batch_steps(name):
    """Unequal micro-batches accumulated and averaged == the same optimizer on the full-batch mean loss."""
    make_opt = OPTIMIZERS[name]
    model = tiny_model()
    reference = copy.deepcopy(model)
    ref_opt = make_opt(reference.parameters())
    acc = GradientAccumulator(make_opt(model.parameters()), FixedPolicy(33), model=model)
    steps = [digits_batches([5, 16, 3, 9], seed=s) for s in range(3)]
    for micro in steps:
        fired = [acc.accumulate(len(yb), backward_on(model, xb, yb)) for xb, yb in micro]
        assert fired == [False, False, False, True]
        acc.step()
        ref_opt.zero_grad()
        backward_on(reference, torch.cat([x for x, _ in micro]), torch.cat([y for _, y in micro]))
        ref_opt.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert [r.samples for r in acc.history] == [33, 33, 33]
    assert all(r.micro_batches == 4 and len(r.angles) == 3 for r in acc.history)


def test_history_fields():
    model = tiny_model()
    acc = GradientAccumulator(torch.optim.SGD(model.parameters(), lr=0.1), FixedPolicy(24), model=model)
    micro = digits_batches([8, 8, 8])
    losses = [backward_on(model, xb, yb) for xb, yb in micro[:1]]
    acc.accumulate(8, losses[0])
    for xb, yb in micro[1:]:
        losses.append(backward_on(model, xb, yb))
        acc.accumulate(8, losses[-1].item())  # a float loss works too
    record = acc.step()
    assert (record.step, record.micro_batches, record.samples, len(record.angles)) == (0, 3, 24, 2)
    assert all(0 < a < 90 for a in record.angles)
    assert record.loss == pytest.approx(torch.stack(losses).mean().item(), rel=1e-6)
    assert math.isfinite(record.trace) and math.isfinite(record.noise_scale_step)
    assert record.noise_scale == pytest.approx(record.noise_scale_step)  # the average of one estimate
    assert record.lr == 0.1 and not record.dropped and not record.forced and record.nonfinite == 0


# -- bad input -------------------------------------------------------------------------------------------


def fresh(policy=None, **kwargs):
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, GradientAccumulator(opt, policy or FixedPolicy(64), model=model, **kwargs)


def test_accumulate_before_any_backward_raises():
    model, acc = fresh()
    with pytest.raises(RuntimeError, match="expected a backward"):
        acc.accumulate(8)
    feed(acc, torch.ones(num_elements(model)), samples=8)
    with pytest.raises(RuntimeError, match="expected a backward"):
        acc.accumulate(8)  # the same gradient twice


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, None])
def test_num_samples_must_be_a_positive_int(bad):
    model, acc = fresh()
    backward_on(model, *digits_batches([4])[0])
    with pytest.raises(ValueError, match="num_samples: expected a positive int"):
        acc.accumulate(bad)


def test_misuse_errors():
    model, acc = fresh()
    with pytest.raises(RuntimeError, match="step: expected at least one accumulate"):
        acc.step()
    feed(acc, torch.ones(num_elements(model)), samples=4)
    with pytest.raises(RuntimeError, match="state_dict: expected a step boundary"):
        acc.state_dict()
    with pytest.raises(TypeError, match=r"optimizer: expected a torch\.optim\.Optimizer"):
        GradientAccumulator(object(), FixedPolicy(4))
    with pytest.raises(TypeError, match="policy: expected a BatchPolicy"):
        GradientAccumulator(acc.optimizer, "angle")
    with pytest.raises(ValueError, match="read_lag"):
        GradientAccumulator(acc.optimizer, FixedPolicy(4), read_lag=2)


# -- non-finite micro-batches ----------------------------------------------------------------------------


@pytest.mark.parametrize("lag", [0, 1])
@pytest.mark.parametrize("position", [0, 2, 3])
def test_nonfinite_micro_batch_is_dropped_exactly(position, lag, caplog):
    """The step with a poisoned micro-batch equals, bit for bit, the step without it."""
    gen = torch.Generator().manual_seed(position)
    n = num_elements(tiny_model())
    grads = [torch.randn(n, generator=gen) for _ in range(4)]
    sizes = [3, 5, 7, 11]
    bad = grads[position].clone()
    bad[5], bad[n - 1] = math.inf, math.nan
    runs = []
    for poisoned in (True, False):
        model, acc = fresh(Never(max_samples=10**6), read_lag=lag)
        for k, (g, s) in enumerate(zip(grads, sizes)):
            if k == position and poisoned:
                with caplog.at_level(logging.WARNING):
                    feed(acc, bad, samples=s)
            elif k != position:
                feed(acc, g, samples=s)
        runs.append((acc.step(), [p.detach().clone() for p in model.parameters()]))
    (record, params), (clean_record, clean_params) = runs
    assert all(torch.equal(p, q) for p, q in zip(params, clean_params))
    assert record.nonfinite == 1 and clean_record.nonfinite == 0
    assert record.samples == sum(sizes) - sizes[position] and record.micro_batches == 3
    assert record.angles == clean_record.angles
    assert "non-finite gradient" in caplog.text


def test_all_micro_batches_nonfinite_drops_the_step():
    model, acc = fresh()
    before = [p.detach().clone() for p in model.parameters()]
    feed(acc, torch.full((num_elements(model),), math.nan), samples=4)
    record = acc.step()
    assert record.dropped and record.nonfinite == 1 and record.samples == 0
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


# -- policies that never fire, the read lag --------------------------------------------------------------


@pytest.mark.parametrize("lag", [0, 1])
def test_policy_that_never_fires_is_forced_by_the_maximum(lag):
    model, acc = fresh(Never(max_samples=48), read_lag=lag)
    fired = [feed(acc, torch.ones(num_elements(model)), samples=16) for _ in range(3)]
    assert fired == [False, False, True]  # a count-only stop is exact even with a late read
    record = acc.step()
    assert record.forced and record.samples == 48


def test_read_lag_one_decides_one_micro_batch_late():
    """The angle rule fires at micro-batch 5; read one late, the step takes micro-batch 6 as well."""
    for lag, expected in ((0, 5), (1, 6)):
        model, acc = fresh(AnglePolicy(max_samples=100), read_lag=lag)
        grads = angle_sequence([50, 40, 30, 34, 31, 29], num_elements(model))
        k = next(k for k, g in enumerate(grads, start=1) if feed(acc, g))
        assert k == expected
        record = acc.step()
        assert record.micro_batches == expected
        assert record.angles == pytest.approx([50, 40, 30, 34, 31][: expected - 1], abs=1e-2)


# -- learning-rate rules, layouts, mixed dtypes ----------------------------------------------------------


def test_lr_rule_scales_every_param_group():
    model = tiny_model()
    groups = [
        {"params": list(model.inp.parameters()) + list(model.layers.parameters()), "lr": 0.1},
        {"params": list(model.head.parameters()), "lr": 0.01},
    ]
    opt = torch.optim.SGD(groups)
    acc = GradientAccumulator(opt, FixedPolicy(48), LinearRule(batch_ref=16), model=model)
    for _ in range(3):
        feed(acc, torch.ones(num_elements(model)), samples=16)
    before = [p.detach().clone() for p in model.parameters()]
    record = acc.step()
    assert record.lr == pytest.approx(0.3)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.01]  # the scheduler's values, restored
    moved = [(q - p.detach()).abs().max().item() for p, q in zip(model.parameters(), before)]
    head = len(list(model.head.parameters()))
    assert moved[:-head] == pytest.approx([0.3] * (len(moved) - head))  # lr * 3 * mean grad 1
    assert moved[-head:] == pytest.approx([0.03] * head)


def test_reuses_the_optimizer_layout():
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.layout = FlatLayout(model.named_parameters())
    acc = GradientAccumulator(opt, FixedPolicy(4))
    assert acc.layout is opt.layout
    opt.layout = "flat"
    with pytest.raises(TypeError, match=r"optimizer.layout: expected a FlatLayout"):
        GradientAccumulator(opt, FixedPolicy(4))


def test_mixed_dtype_buffers():
    """A float32 and a bfloat16 parameter: two flat buffers, one set of sums, one averaged step."""
    gen = torch.Generator().manual_seed(0)
    w32 = nn.Parameter(torch.randn(37, generator=gen))
    w16 = nn.Parameter(torch.randn(50, generator=gen).bfloat16())
    opt = torch.optim.SGD([w32, w16], lr=1.0)
    acc = GradientAccumulator(opt, FixedPolicy(3))
    assert len(acc.layout.buffers) == 2
    start = [w32.detach().double().clone(), w16.detach().double().clone()]
    grads = [torch.randn(87, generator=gen).bfloat16().float() for _ in range(3)]
    for g in grads:
        feed(acc, g)
    record = acc.step()
    mean = torch.stack(grads).double().mean(0)
    torch.testing.assert_close(w32.detach().double(), start[0] - mean[:37], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(w16.detach().double(), start[1] - mean[37:], rtol=1e-2, atol=1e-2)
    a1, a2, a3 = (sum(grads[:k]).double() for k in (1, 2, 3))
    expected = [math.degrees(math.acos(x @ y / (x.norm() * y.norm()))) for x, y in ((a1, a2), (a2, a3))]
    assert record.angles == pytest.approx(expected, abs=1e-3)


# -- resume ----------------------------------------------------------------------------------------------

RESUME_POLICIES = {
    "angle-groups": lambda: (AnglePolicy(groups="auto", max_samples=96, seed=3), None),
    "noise-surge": lambda: (NoiseScalePolicy(min_samples=16, max_samples=128), SurgeRule(batch_ref=32)),
    "cabs": lambda: (CABSPolicy(min_samples=16, max_samples=128, c=200.0), None),
}


@pytest.mark.parametrize("name", RESUME_POLICIES)
def test_resume_makes_the_same_decisions(name):
    micro = digits_batches([8] * 120, seed=1)

    def build():
        model = tiny_model()
        policy, rule = RESUME_POLICIES[name]()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        return model, opt, GradientAccumulator(opt, policy, rule, model=model)

    def run(model, acc, batches, stop_after_steps=None):
        for i, (xb, yb) in enumerate(batches):
            if acc.accumulate(len(yb), backward_on(model, xb, yb)):
                acc.step()
                if stop_after_steps is not None and len(acc.history) == stop_after_steps:
                    return i + 1
        return len(batches)

    model, _, acc = build()
    run(model, acc, micro)
    whole = [(r.samples, r.angles, r.lr) for r in acc.history]

    model, opt, acc = build()
    used = run(model, acc, micro, stop_after_steps=4)
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), acc.state_dict()))
    model, opt, acc = build()
    model.load_state_dict(saved[0])
    opt.load_state_dict(saved[1])
    acc.load_state_dict(saved[2])
    run(model, acc, micro[used:])
    resumed = [(r.samples, r.angles, r.lr) for r in acc.history]
    assert len(set(s for s, _, _ in whole)) > 1, "the policy never varied the batch: a weak test"
    assert resumed == whole
