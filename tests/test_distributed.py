"""GradientAccumulator under DistributedDataParallel (gloo on CPU, 2 and 3 ranks, each on its own data).

The ``case_*`` functions run inside the ranks (:mod:`dist_helpers`: one process group per world size for
the whole module); the tests compare what they return with each other and with one process trained on
the ranks' micro-batches concatenated (rank order), which is what the ranks' sample-weighted reduction
computes. Micro-batch sizes differ between ranks and rounds throughout.
"""

from __future__ import annotations

import contextlib
import functools
import math
import tempfile
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from dist_helpers import result, run_cases
from synthetic import one_thread, tiny_model  # noqa: F401  (one_thread: an autouse fixture)
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dynbatch_kernels.batching import (
    AnglePolicy,
    CABSPolicy,
    FixedPolicy,
    GradientAccumulator,
    NoiseScalePolicy,
    VarianceSums,
)
from dynbatch_kernels.data import load_digits_split
from dynbatch_kernels.optim import ExtrapSGD, FusedLAMB

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

MODES = ("local", "exact")
WORLD_SIZES = (2, 3)
OPTIMIZERS = {
    "fused-lamb": lambda ps: FusedLAMB(ps, lr=1e-2),
    "extrap-past": lambda ps: ExtrapSGD(ps, lr=0.1, mode="past"),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2),
}
POLICIES = {
    "angle": lambda world: AnglePolicy(groups="auto", max_samples=40 * world, seed=3),
    "cabs": lambda world: CABSPolicy(min_samples=8 * world, max_samples=40 * world, c=200.0),
    "noise": lambda world: NoiseScalePolicy(min_samples=8 * world, max_samples=40 * world),
}
FIXED_ROUNDS, POLICY_ROUNDS = 12, 40


# -- data and runs (used by the ranks and by the single-process references) -----------------------------


@functools.cache
def rounds(world: int, count: int, size: int | None = None) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """``count`` rounds of one micro-batch per rank, disjoint, of ``size`` samples (default: ``n_{k,r} =
    4 + (3k + 5r) mod 7``)."""
    data = load_digits_split()
    order = torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(0))
    out, start = [], 0
    for k in range(count):
        out.append([])
        for r in range(world):
            idx = order[start : start + (size or 4 + (3 * k + 5 * r) % 7)]
            out[-1].append((data.x_train[idx], data.y_train[idx]))
            start += len(idx)
    return out


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def summary(acc: GradientAccumulator) -> list[tuple]:
    """What the decisions were: per step (micro-batches, samples, angles, dropped, non-finite, estimates)."""
    return [
        (r.micro_batches, r.samples, r.angles, r.dropped, r.nonfinite, r.trace, r.grad_sq)
        for r in acc.history
    ]


def train(model: nn.Module, forward: nn.Module, acc: GradientAccumulator, batches, poison: int | None = None):
    """Feed ``batches`` (one per round; a ``None`` round is skipped) and step when the accumulator says so;
    ``poison``: make that round's gradient non-finite."""
    for k, batch in enumerate(batches):
        if batch is None:
            continue
        xb, yb = batch
        loss = nn.functional.cross_entropy(forward(xb), yb)
        loss.backward()
        if k == poison:
            with torch.no_grad():
                next(model.parameters()).grad[0, 0] = math.nan
        if acc.accumulate(len(yb), loss.detach()):
            acc.step()


def setup_ddp(mode: str, make_opt, policy, seed: int = 0):
    model = tiny_model(seed)
    ddp = DistributedDataParallel(model)
    return model, ddp, GradientAccumulator(make_opt(model.parameters()), policy, model=ddp, ddp_sync=mode)


def run_ddp(rank: int, mode: str, make_opt, policy, batches, poison: int | None = None):
    model, ddp, acc = setup_ddp(mode, make_opt, policy)
    train(model, ddp, acc, [b[rank] if b is not None else None for b in batches], poison)
    return model, acc


def run_single(make_opt, policy, batches):
    """One process on the rounds' micro-batches concatenated."""
    model = tiny_model()
    acc = GradientAccumulator(make_opt(model.parameters()), policy, model=model)
    train(model, model, acc, [(torch.cat([x for x, _ in b]), torch.cat([y for _, y in b])) for b in batches])
    return model, acc


# -- the cases (inside the ranks) ----------------------------------------------------------------------


def case_fixed(rank: int, world: int) -> dict:
    out = {}
    for mode in MODES:
        for name, make_opt in OPTIMIZERS.items():
            model, acc = run_ddp(rank, mode, make_opt, FixedPolicy(24 * world), rounds(world, FIXED_ROUNDS))
            out[mode, name] = (flat_params(model), summary(acc))
        _, acc = run_ddp(rank, mode, OPTIMIZERS["adamw"], FixedPolicy(32 * world), rounds(world, 8, size=16))
        out[mode, "even"] = [r.micro_batches for r in acc.history]
    return out


def case_policies(rank: int, world: int) -> dict:
    return {
        (mode, name): summary(
            run_ddp(rank, mode, OPTIMIZERS["adamw"], make(world), rounds(world, POLICY_ROUNDS))[1]
        )
        for mode in MODES
        for name, make in POLICIES.items()
    }


def case_nonfinite(rank: int, world: int) -> dict:
    """Round 3 poisoned on rank 1 only, against round 3 left out on every rank."""
    batches = rounds(world, FIXED_ROUNDS)
    skipped = [None if k == 3 else b for k, b in enumerate(batches)]
    out = {}
    for mode in MODES:
        policy = FixedPolicy(24 * world)
        model, acc = run_ddp(
            rank, mode, OPTIMIZERS["adamw"], policy, batches, poison=3 if rank == 1 else None
        )
        clean, clean_acc = run_ddp(rank, mode, OPTIMIZERS["adamw"], FixedPolicy(24 * world), skipped)
        out[mode] = (flat_params(model), summary(acc), flat_params(clean), summary(clean_acc))
    return out


def case_resume(rank: int, world: int) -> dict:
    """Stop after 3 steps, save on rank 0 only, resume every rank from rank 0's file."""
    batches = rounds(world, POLICY_ROUNDS)
    out = {}
    for mode in MODES:
        _, whole = run_ddp(rank, mode, OPTIMIZERS["adamw"], POLICIES["angle"](world), batches)
        model, ddp, acc = setup_ddp(mode, OPTIMIZERS["adamw"], POLICIES["angle"](world))
        used = 0
        while len(acc.history) < 3:
            train(model, ddp, acc, [batches[used][rank]])
            used += 1
        path = [tempfile.mkdtemp() if rank == 0 else None]
        dist.broadcast_object_list(path)
        checkpoint = Path(path[0]) / "checkpoint.pt"
        if rank == 0:
            torch.save((model.state_dict(), acc.optimizer.state_dict(), acc.state_dict()), checkpoint)
        dist.barrier()
        state = torch.load(checkpoint, weights_only=False)
        model, ddp, acc = setup_ddp(mode, OPTIMIZERS["adamw"], POLICIES["angle"](world), seed=1)
        model.load_state_dict(state[0])
        acc.optimizer.load_state_dict(state[1])
        acc.load_state_dict(state[2])
        train(model, ddp, acc, [b[rank] for b in batches[used:]])
        out[mode] = (summary(whole), summary(acc))
    return out


def case_noise_scale(rank: int, world: int) -> dict:
    """One micro-batch per rank and step: the estimate comes from the ranks alone."""
    batches = rounds(world, 1)
    policy = FixedPolicy(sum(len(y) for _, y in batches[0]))
    return {mode: summary(run_ddp(rank, mode, OPTIMIZERS["adamw"], policy, batches)[1]) for mode in MODES}


def case_stop_early(rank: int, world: int) -> str | None:
    """Every rank but 0 stops before its first micro-batch: rank 0 fails with the group's timeout."""
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=1))
    model = tiny_model()
    ddp = DistributedDataParallel(model, process_group=group)
    acc = GradientAccumulator(torch.optim.SGD(model.parameters(), lr=0.1), FixedPolicy(64), model=ddp)
    if rank != 0:
        return None
    xb, yb = rounds(world, 1)[0][0]
    nn.functional.cross_entropy(ddp(xb), yb).backward()
    try:
        acc.accumulate(len(yb))
    except RuntimeError as exc:
        return str(exc)
    return "no error"


def case_no_sync(rank: int, world: int) -> dict:
    """The user's ``no_sync()`` on all micro-batches but the last changes nothing; turning DDP's sync back
    on fails at the next ``accumulate``."""
    total = sum(len(y) for b in rounds(world, 4) for _, y in b)
    model, ddp, acc = setup_ddp("local", OPTIMIZERS["adamw"], FixedPolicy(total))
    for k, b in enumerate(rounds(world, 4)):
        xb, yb = b[rank]
        with ddp.no_sync() if k < 3 else contextlib.nullcontext():
            nn.functional.cross_entropy(ddp(xb), yb).backward()
        if acc.accumulate(len(yb)):
            acc.step()
    plain, _ = run_ddp(rank, "local", OPTIMIZERS["adamw"], FixedPolicy(total), rounds(world, 4))
    batches = [b[rank] for b in rounds(world, 4)]
    ddp.require_backward_grad_sync = True
    message = "no error"
    nn.functional.cross_entropy(ddp(batches[0][0]), batches[0][1]).backward()
    try:
        acc.accumulate(len(batches[0][1]))
    except RuntimeError as exc:
        message = str(exc)
    same = torch.equal(flat_params(model), flat_params(plain))
    return {"same": same, "steps": acc.steps, "message": message}


CASES = [
    case_fixed,
    case_no_sync,
    case_policies,
    case_nonfinite,
    case_resume,
    case_noise_scale,
    case_stop_early,  # the last: its process group is left broken
]


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda w: f"world{w}")
def ranks(request, tmp_path_factory) -> tuple[int, list[dict]]:
    """Every rank's results of every case, once per world size."""
    world = request.param
    return world, run_cases(CASES, world, tmp_path_factory.mktemp(f"world{world}"))


# -- the tests (in the parent) -------------------------------------------------------------------------


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def cosines(history: list[tuple]) -> list[float]:
    return [math.cos(math.radians(a)) for step in history for a in step[2]]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_fixed_policy_equals_one_process_on_the_concatenated_batches(ranks, mode, name):
    world, results = ranks
    values = result(results, "case_fixed")
    params = [v[mode, name][0] for v in values]
    assert all(torch.equal(p, params[0]) for p in params[1:]), "ranks' parameters differ"
    assert all(v[mode, name][1] == values[0][mode, name][1] for v in values)
    model, acc = run_single(OPTIMIZERS[name], FixedPolicy(24 * world), rounds(world, FIXED_ROUNDS))
    assert relative(params[0], flat_params(model)) < 1e-6
    assert [s[:2] for s in values[0][mode, name][1]] == [s[:2] for s in summary(acc)]  # same steps


@pytest.mark.parametrize("mode", MODES)
def test_fixed_policy_counts_global_samples(ranks, mode):
    _, results = ranks
    for value in result(results, "case_fixed"):
        assert value[mode, "even"] == [2, 2, 2, 2]  # 16 samples per rank and micro-batch, 32 * world a step


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", POLICIES)
def test_policies_decide_the_same_on_every_rank(ranks, mode, name):
    world, results = ranks
    histories = [v[mode, name] for v in result(results, "case_policies")]
    assert all(h == histories[0] for h in histories[1:])
    assert len({step[1] for step in histories[0]}) > 1, "the policy never varied the batch: a weak test"
    if mode == "exact":  # the angle of the global accumulated gradient: one process's on the same data
        _, acc = run_single(OPTIMIZERS["adamw"], POLICIES[name](world), rounds(world, POLICY_ROUNDS))
        single = summary(acc)
        if name != "angle":  # the variance estimates differ (R K parts here, K there): compare one step
            histories[0], single = histories[0][:1], single[:1]
        assert [s[:2] for s in histories[0]] == [s[:2] for s in single]
        assert cosines(histories[0]) == pytest.approx(cosines(single), abs=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_nonfinite_micro_batch_on_one_rank_is_dropped_on_every_rank(ranks, mode):
    _, results = ranks
    values = [v[mode] for v in result(results, "case_nonfinite")]
    params, history, clean, clean_history = values[0]
    assert all(torch.equal(v[0], params) for v in values[1:])
    assert torch.equal(params, clean)
    assert [s[4] for s in history] == [1] + [0] * (len(history) - 1)
    assert [s[:3] for s in history] == [s[:3] for s in clean_history]


@pytest.mark.parametrize("mode", MODES)
def test_resume_from_a_rank0_checkpoint(ranks, mode):
    _, results = ranks
    for whole, resumed in (v[mode] for v in result(results, "case_resume")):
        assert resumed == whole


@pytest.mark.parametrize("mode", MODES)
def test_noise_scale_from_the_ranks_micro_batches(ranks, mode):
    """K = 1 per rank: ``tr(Sigma)`` and ``|G_true|^2`` from per-rank ``|g_r|^2`` and the global ``|G|^2``."""
    world, results = ranks
    (step,) = result(results, "case_noise_scale")[0][mode]
    model = tiny_model()
    grads, sizes = [], []
    for xb, yb in rounds(world, 1)[0]:
        model.zero_grad()
        nn.functional.cross_entropy(model(xb), yb).backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double())
        sizes.append(len(yb))
    n = sum(sizes)
    big = sum(b * g for b, g in zip(sizes, grads)) / n
    small = sum(b * g.square().sum() for b, g in zip(sizes, grads))
    trace = (small - n * big.square().sum()) / (world - 1)
    assert step[5] == pytest.approx(trace.item(), rel=1e-4)
    assert step[6] == pytest.approx((big.square().sum() - trace / n).item(), rel=1e-4)


def test_no_sync_pattern_and_turning_sync_back_on(ranks):
    _, results = ranks
    for value in result(results, "case_no_sync"):
        assert value["same"] and value["steps"] == 1 and "do not set it back" in value["message"]


def test_a_rank_that_stops_early_fails_the_others_with_the_timeout(ranks):
    world, results = ranks
    message, *others = result(results, "case_stop_early")
    assert "all-reduce over" in message and "timeout" in message
    assert others == [None] * (world - 1)


@pytest.mark.parametrize("world,b", [(2, 8), (4, 3), (8, 16)])
def test_two_batch_noise_scale_is_unbiased(world, b):
    """Synthetic per-sample gradients ``mu + sigma z``: the ranks' micro-batches (``b`` samples each) and
    their sum give ``E tr(Sigma) = d sigma^2`` and ``E |G_true|^2 = |mu|^2``."""
    gen = torch.Generator().manual_seed(world)
    d, sigma, trials = 50, 0.5, 4000
    mu = torch.randn(d, generator=gen, dtype=torch.float64) * 0.1
    traces, signals = [], []
    for _ in range(trials):
        grads = mu + sigma * torch.randn(world, d, generator=gen, dtype=torch.float64) / math.sqrt(b)
        sums = VarianceSums()
        sums.add_parts(world * b, b * grads.square().sum().item(), world)
        estimate = sums.estimate((b * grads.sum(0)).square().sum().item())
        traces.append(estimate.trace)
        signals.append(estimate.grad_sq)
    truth = d * sigma**2
    spread = truth / math.sqrt(trials) * 4  # a few standard errors
    assert abs(sum(traces) / trials - truth) < spread * math.sqrt(2)
    assert abs(sum(signals) / trials - (mu @ mu).item()) < spread / (world * b) * 2
