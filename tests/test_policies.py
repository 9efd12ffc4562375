"""Batch policies driven through the accumulator and the real fused op by synthetic gradient sequences."""

from __future__ import annotations

import math

import pytest
import torch
from synthetic import (
    angle_sequence,
    feed,
    noisy_gradients,
    num_elements,
    one_thread,  # noqa: F401  (an autouse fixture)
    tiny_model,
)

from dynbatch_kernels.batching import (
    AnglePolicy,
    CABSPolicy,
    FixedPolicy,
    GradientAccumulator,
    NoiseScalePolicy,
    StepSummary,
    infer_groups,
)
from dynbatch_kernels.data import load_digits_split, micro_batches


def make(policy, lr: float = 0.0):
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    return model, GradientAccumulator(opt, policy, model=model)


def first_step(acc: GradientAccumulator, grads: list[torch.Tensor]):
    """Feed ``grads`` until the accumulator asks for a step; (micro-batch number, record) or (None, None)."""
    for k, g in enumerate(grads, start=1):
        if feed(acc, g):
            return k, acc.step()
    return None, None


# -- the angle rule --------------------------------------------------------------------------------------

ANGLE_CASES = {
    # angles at micro-batches 2, 3, ...          step at     why
    "falling-then-rising": ([50, 40, 30, 34, 20, 20], 5),  # 34 >= 1.1 * 30
    "three-non-minima": ([50, 40, 42, 41, 30, 32, 31], 7),  # 42, 41 count; 30 new min (no reset); 32 third
    "guard-violation": ([80, 70, 85, 60], 4),  # 85 >= 77 fires, but 85 > 90/1.1: dropped
}


@pytest.mark.parametrize("case", ANGLE_CASES)
def test_angle_rule_steps_at_the_named_micro_batch(case):
    angles, expected = ANGLE_CASES[case]
    model, acc = make(AnglePolicy(max_samples=100))
    k, record = first_step(acc, angle_sequence(angles, num_elements(model)))
    assert k == expected
    assert record.angles == pytest.approx(angles[: expected - 1], abs=1e-2)
    assert record.micro_batches == expected and not record.forced
    assert record.dropped == (case == "guard-violation")


def test_guard_drop_leaves_parameters_and_clears_the_accumulator():
    model, acc = make(AnglePolicy(max_samples=100), lr=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    k, record = first_step(acc, angle_sequence([80, 70, 85], num_elements(model)))
    assert record.dropped and not record.applied and k == 4  # the user does not step the LR scheduler
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert all((a == 0).all() for a in acc._buffers.acc)
    # the next step starts from scratch: its first angle sets a new a_min
    k, record = first_step(acc, angle_sequence([50, 40, 30, 34], num_elements(model), seed=1))
    assert k == 5 and not record.dropped
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_angle_policy_never_firing_is_forced_by_the_maximum():
    model, acc = make(AnglePolicy(max_samples=6))
    k, record = first_step(acc, angle_sequence([60, 50, 40, 30, 20, 10, 5], num_elements(model)))
    assert k == 6 and record.forced and record.samples == 6 and not record.dropped


def test_angle_policy_respects_min_samples():
    model, acc = make(AnglePolicy(min_samples=7, max_samples=100))
    k, _ = first_step(acc, angle_sequence([50, 40, 30, 34, 36, 37, 38], num_elements(model)))
    assert k == 7  # the rule fired at 5, the minimum holds it to 7


def test_monitored_group_drives_the_decision():
    """layers.0 turns by [50, 40, 30, 34]; the (10x larger) rest keeps falling: only the group fires at 5."""
    model = tiny_model()
    names = [n for n, _ in model.named_parameters()]
    sizes = [p.numel() for p in model.parameters()]
    mask = torch.cat([torch.full((s,), n.startswith("layers.0.")) for n, s in zip(names, sizes)])
    group = angle_sequence([50, 40, 30, 34, 33, 32], int(mask.sum()), seed=3)
    rest = angle_sequence([50, 45, 40, 36, 33, 30], int((~mask).sum()), seed=4)
    grads = []
    for g, r in zip(group, rest):
        full = torch.zeros(len(mask))
        full[mask], full[~mask] = g, 10 * r
        grads.append(full)
    for groups, expected in ((None, None), ({"block0": ["layers.0."]}, 5)):
        model_k = tiny_model()
        acc = GradientAccumulator(
            torch.optim.SGD(model_k.parameters(), lr=0.0), AnglePolicy(groups=groups), model=model_k
        )
        k, _ = first_step(acc, grads)
        assert k == expected, groups


def test_all_zero_group_is_skipped_and_the_whole_model_drives_the_step():
    """layers.1. gets no gradient (an unused block): monitored, it has no angle and would never fire."""
    model = tiny_model()
    names = [n for n, _ in model.named_parameters()]
    sizes = [p.numel() for p in model.parameters()]
    unused = torch.cat([torch.full((s,), n.startswith("layers.1.")) for n, s in zip(names, sizes)])
    grads = []
    for g in angle_sequence([50, 40, 30, 34, 33], int((~unused).sum())):
        full = torch.zeros(len(unused))
        full[~unused] = g
        grads.append(full)
    acc = GradientAccumulator(
        torch.optim.SGD(model.parameters(), lr=0.0), AnglePolicy(groups="auto", max_samples=100), model=model
    )
    policy = acc.policy
    policy.group = policy.group_names.index("layers.1.")  # as if drawn before any gradient was seen
    assert [feed(acc, g) for g in grads[:5]] == [False] * 4 + [True]
    assert policy.fired and policy.monitored is None  # the whole model's angles fired
    assert policy.angles == pytest.approx([50, 40, 30, 34], abs=1e-2)
    assert policy.zero == [False, True] and all(math.isnan(a) for a in policy.group_angles[1])
    acc.step()
    weights = list(policy.weights)
    assert weights[1] == 1.0 > weights[0]  # never scored: the old draw favoured the zero group
    summary = StepSummary(1, 1, None, math.nan, 0.0, stepped=True)
    for _ in range(100):
        policy.end_step(summary)
        assert policy.monitored == "layers.0."
    policy.zero = [True, True]  # every group zero: all are drawn from again
    draws = set()
    for _ in range(100):
        policy.end_step(summary)
        draws.add(policy.monitored)
    assert draws == {"layers.0.", "layers.1."}


class UnusedBlockMLP(torch.nn.Module):
    """The tiny digits MLP whose block ``layers.1.`` is never used (like an unrouted Transformer layer)."""

    def __init__(self):
        super().__init__()
        self.mlp = tiny_model()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp.head(torch.relu(self.mlp.layers[0](torch.relu(self.mlp.inp(x)))))


def test_angle_policy_fires_on_a_real_model_with_an_unused_block():
    model = UnusedBlockMLP()
    policy = AnglePolicy(groups="auto", max_samples=256, seed=1)
    acc = GradientAccumulator(torch.optim.SGD(model.parameters(), lr=0.1), policy, model=model)
    assert policy.group_names == ["mlp.layers.0.", "mlp.layers.1."]
    data = load_digits_split()
    for xb, yb in micro_batches(data.x_train, data.y_train, 8, torch.Generator().manual_seed(0)):
        torch.nn.functional.cross_entropy(model(xb), yb).backward()
        if acc.accumulate(num_samples=len(yb)):
            if policy.monitored is not None:  # the group's angles from micro-batch 2 on
                assert all(math.isfinite(a) for a in policy.group_angles[policy.group][1:])
            acc.step()
    history = list(acc.history)
    assert policy.zero == [False, True] and len(history) > 10
    assert all(r.group == "mlp.layers.0." for r in history[1:])
    assert sum(r.forced for r in history) <= 1


def test_infer_groups_from_numbered_prefixes():
    names = [n for n, _ in tiny_model().named_parameters()]
    groups = infer_groups(names)
    assert list(groups) == ["layers.0.", "layers.1."]
    assert groups["layers.1."] == [n for n in names if n.startswith("layers.1.")]
    assert list(infer_groups(["0.weight", "0.bias", "2.weight"])) == ["0.", "2."]
    with pytest.raises(ValueError, match="numbered prefix"):
        infer_groups(["embed.weight", "head.weight"])
    with pytest.raises(ValueError, match="matches no parameter"):
        make(AnglePolicy(groups={"missing": ["decoder."]}))


def test_group_scores_and_softmax_sampling():
    model, acc = make(AnglePolicy(groups="auto", max_samples=5, seed=5))
    policy = acc.policy
    assert policy.group_names == ["layers.0.", "layers.1."] and policy.weights == [1.0, 1.0]
    k, _ = first_step(acc, angle_sequence([50, 40, 30, 34], num_elements(model)))
    assert k == 5
    beta = policy.score_beta  # every group scored from its own angles: a score in (0, 1) pulls it below 1
    assert all(beta < w < 1.0 for w in policy.weights) and policy.weights[0] != policy.weights[1]
    # softmax sampling: a weight 5 above the other wins ~99.3% of the draws
    policy.weights = [0.0, 5.0]
    draws = []
    for _ in range(400):
        policy.end_step(StepSummary(1, 1, None, math.nan, 0.0, stepped=True))
        draws.append(policy.group)
    assert 0.97 < sum(draws) / len(draws) < 1.0


def test_group_score_formula():
    model, acc = make(AnglePolicy(groups={"all": [""]}, seed=0))
    _, record = first_step(acc, angle_sequence([50, 40, 30, 34], num_elements(model)))
    beta = acc.policy.score_beta
    score = (50 - 30) / 50
    assert acc.policy.weights[0] == pytest.approx(beta + (1 - beta) * score, abs=1e-5)
    assert record.group == "all"


def test_rebinding_keeps_group_weights_by_name():
    """The accumulator binds again when the optimizer's parameters change: learned weights survive."""
    policy = AnglePolicy(groups="auto", seed=2)
    names = ["layers.0.weight", "layers.1.weight"]
    policy.bind(names)
    policy.weights = [0.3, 0.6]
    group = policy.group
    policy.bind([*names, "head.weight"])  # a new parameter, no new group: nothing restarts
    assert policy.weights == [0.3, 0.6] and policy.group == group
    policy.bind([*names, "layers.2.weight"])
    assert policy.group_names == ["layers.0.", "layers.1.", "layers.2."] and policy.weights == [0.3, 0.6, 1.0]


def test_angle_policy_state_round_trip_repeats_draws():
    _, acc = make(AnglePolicy(groups="auto", seed=11))
    policy = acc.policy
    policy.weights = [0.3, 0.6]
    state = policy.state_dict()
    _, other_acc = make(AnglePolicy(groups="auto", seed=99))
    other_acc.policy.load_state_dict(state)
    summary = StepSummary(1, 1, None, math.nan, 0.0, stepped=True)
    draws = []
    for p in (policy, other_acc.policy):
        seq = []
        for _ in range(30):
            p.end_step(summary)
            seq.append(p.group)
        draws.append(seq)
    assert draws[0] == draws[1] and len(set(draws[0])) == 2


def test_angle_policy_argument_errors():
    with pytest.raises(ValueError, match="tolerance"):
        AnglePolicy(tolerance=1.0)
    with pytest.raises(ValueError, match="patience"):
        AnglePolicy(patience=0)
    with pytest.raises(ValueError, match="max_samples"):
        AnglePolicy(min_samples=8, max_samples=4)
    with pytest.raises(ValueError, match="groups"):
        AnglePolicy(groups="layers")


# -- fixed, noise scale and CABS -------------------------------------------------------------------------


def test_fixed_policy_steps_at_its_size():
    model, acc = make(FixedPolicy(40))
    gen = torch.Generator().manual_seed(0)
    fired = [feed(acc, torch.randn(num_elements(model), generator=gen), samples=16) for _ in range(3)]
    assert fired == [False, False, True]
    record = acc.step()
    assert record.samples == 48 and not record.forced


def run_variance_policy(policy, sigma: float, steps: int, micro: int = 16, lr: float = 0.0):
    """Steps of micro-batches with per-sample gradients mean + sigma * N(0, I); returns the accumulator."""
    model, acc = make(policy, lr=lr)
    gen = torch.Generator().manual_seed(7)
    mean = torch.full((num_elements(model),), 0.1)
    while len(acc.history) < steps:
        (g,) = noisy_gradients(mean, sigma, [micro], gen)
        if feed(acc, g, samples=micro, loss=1.0):
            acc.step()
    return acc


def test_noise_scale_policy_follows_the_noise():
    """B_simple = D sigma^2 / |mean|^2 = sigma^2 / 0.01: 100 and 900 samples for sigma 1 and 3."""
    batches = {}
    for sigma in (0.3, 1.0, 3.0):
        acc = run_variance_policy(NoiseScalePolicy(min_samples=16, max_samples=4096), sigma, steps=25)
        assert all(r.micro_batches >= 2 for r in acc.history)
        batches[sigma] = sum(r.samples for r in list(acc.history)[-10:]) / 10
        assert acc.estimator.noise_scale == pytest.approx(sigma**2 / 0.01, rel=0.3)
    assert batches[0.3] < batches[1.0] < batches[3.0]
    assert batches[1.0] == pytest.approx(100, rel=0.3) and batches[3.0] == pytest.approx(900, rel=0.3)


def test_cabs_policy_follows_the_noise():
    """B = c lr tr(Sigma)_ema / L_ema with L = 1, lr = 0.1, tr(Sigma) = D sigma^2 (D = 898)."""
    found = {}
    for sigma in (1.0, 3.0):
        acc = run_variance_policy(CABSPolicy(min_samples=16, max_samples=4096), sigma, steps=30, lr=0.1)
        policy = acc.policy
        d = num_elements(tiny_model())
        ema_weight = 1 - policy.mu ** len(acc.history)  # the trace EMA starts at 0
        assert policy.trace_ema == pytest.approx(ema_weight * d * sigma**2, rel=0.15)
        assert policy.batch_size == max(16, round(0.1 * policy.trace_ema / policy.loss_ema))
        found[sigma] = policy.batch_size
    assert found[3.0] == pytest.approx(9 * found[1.0], rel=0.3)


def test_variance_policies_state_round_trip():
    acc = run_variance_policy(CABSPolicy(), 1.0, steps=3, lr=0.01)
    copy = CABSPolicy()
    copy.load_state_dict(acc.policy.state_dict())
    assert copy.state_dict() == acc.policy.state_dict()
    noise = NoiseScalePolicy(min_samples=4, initial_samples=8)
    assert noise.state_dict()["min_samples"] == 4
    with pytest.raises(ValueError, match="initial_samples"):
        NoiseScalePolicy(min_samples=16, initial_samples=8)
    with pytest.raises(ValueError, match="mu"):
        CABSPolicy(mu=1.0)
    model, acc = make(CABSPolicy())
    with pytest.raises(ValueError, match="loss: CABSPolicy needs"):
        feed(acc, torch.ones(num_elements(model)), samples=16)
