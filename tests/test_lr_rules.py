"""Learning-rate rules: values against docs/algorithms.md, calibration, fallbacks, state."""

from __future__ import annotations

import math

import pytest
import torch

from dynbatch_kernels.batching import LinearRule, SGDRule, SqrtRule, SurgeRule, make_lr_rule
from dynbatch_kernels.batching.lr_rules import scaled_lrs


def test_linear_and_sqrt_from_reference():
    assert LinearRule(64).factor(256, math.nan) == pytest.approx(4.0)
    assert SqrtRule(64).factor(256, math.nan) == pytest.approx(2.0)
    assert SqrtRule(64).factor(16, 1e9) == pytest.approx(0.5)


def test_sgd_rule_matches_formula():
    rule = SGDRule(batch_ref=100, noise_ref=100.0)  # lr0 at B0 = 100 = B_noise: lr_max = 2 lr0
    for b in (10, 100, 1000):
        assert rule.factor(b, 100.0) == pytest.approx(2.0 / (1.0 + 100.0 / b))


def test_surge_rule_peaks_at_noise_scale_and_moves():
    rule = SurgeRule(batch_ref=64, noise_ref=64.0)  # calibrated at its peak: lr_max = lr0
    sizes = [2**i for i in range(1, 14)]
    factors = [rule.factor(b, 256.0) for b in sizes]
    assert max(factors) == pytest.approx(1.0) and sizes[factors.index(max(factors))] == 256
    assert factors[1] / factors[0] == pytest.approx(math.sqrt(2), rel=0.05)  # ~sqrt(B) for small B
    assert factors[-1] < factors[-2] < factors[-3]  # falls beyond the peak
    later = [rule.factor(b, 4096.0) for b in sizes]
    assert sizes[later.index(max(later))] == 4096


def test_noise_rules_calibrate_on_first_estimate_and_keep_last_usable():
    rule = SurgeRule(batch_ref=32)
    assert rule.factor(128, math.nan) == 1.0  # nothing to calibrate on yet
    assert rule.factor(32, 500.0) == pytest.approx(1.0)  # calibrated here: lr(B0) = lr0
    usable = rule.factor(128, 500.0)
    assert usable > 1.0
    assert rule.factor(128, math.inf) == pytest.approx(usable)
    assert rule.factor(128, -3.0) == pytest.approx(usable)
    copy = SurgeRule(batch_ref=1)
    copy.load_state_dict(rule.state_dict())
    assert copy.factor(77, math.nan) == pytest.approx(rule.factor(77, math.nan))


def test_make_lr_rule_and_errors():
    assert make_lr_rule("none", 64) is None
    assert isinstance(make_lr_rule("surge", 64), SurgeRule)
    assert isinstance(make_lr_rule("sgd", 64), SGDRule)
    with pytest.raises(ValueError, match="name: expected one of"):
        make_lr_rule("cosine", 64)
    with pytest.raises(ValueError, match="batch_ref"):
        LinearRule(0)
    with pytest.raises(ValueError, match="noise_ref"):
        SGDRule(8, noise_ref=-1.0)


def test_scaled_lrs_restores_the_schedulers_values_exactly():
    w = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([{"params": [w], "lr": 0.1}, {"params": [], "lr": torch.tensor(0.3)}])
    tensor_lr = opt.param_groups[1]["lr"]
    with pytest.raises(RuntimeError, match="inside"), scaled_lrs(opt, 3.0):
        assert opt.param_groups[0]["lr"] == pytest.approx(0.3)
        assert tensor_lr.item() == pytest.approx(0.9)
        raise RuntimeError("inside")
    assert opt.param_groups[0]["lr"] == 0.1  # restored, not divided back
    assert opt.param_groups[1]["lr"] is tensor_lr and torch.equal(tensor_lr, torch.tensor(0.3))
