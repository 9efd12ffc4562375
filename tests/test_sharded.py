"""FusedLAMB under torch's sharded optimizers, on 2 gloo processes: ZeroRedundancyOptimizer equals one
process (with ``max_grad_norm``, given ``grad_norm_group``), and FSDP1's flat parameters are refused."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from dist_helpers import result, run_cases
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer

from dynbatch_kernels.optim import ExtrapSGD, FusedLAMB

STEPS = 10
LAMB = {"lr": 0.02, "weight_decay": 0.01, "trust_clip": (0.0, 1.0), "max_grad_norm": 0.1}


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 4))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(32, 8, generator=gen), torch.randint(0, 4, (32,), generator=gen)


def train(net: nn.Module, opt: torch.optim.Optimizer) -> torch.Tensor:
    """STEPS steps on the same batches on every rank (the gradient is whole on each)."""
    for step in range(STEPS):
        x, y = batch(step)
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()])


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def zero_against_one_process(optimizer_class, options: dict, group: bool) -> float:
    """Relative difference of ZeroRedundancyOptimizer's parameters after STEPS steps from one process; for
    FusedLAMB the larger of that and the difference of the last trust ratios (every rank's partition's,
    put back in parameter order)."""
    reference = model()
    ref_opt = optimizer_class(reference.parameters(), **options)
    expected = train(reference, ref_opt)
    net = model()
    extra = {"grad_norm_group": dist.group.WORLD} if group else {}
    zero = ZeroRedundancyOptimizer(net.parameters(), optimizer_class=optimizer_class, **options, **extra)
    difference = relative(train(net, zero), expected)
    if optimizer_class is FusedLAMB:
        index = {id(p): i for i, p in enumerate(net.parameters())}
        local = zero.optim
        mine = [
            (index[id(p)], r)
            for p, r in zip(local.param_groups[0]["params"], local.last_trust_ratios.tolist())
        ]
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, mine)
        ratios = torch.tensor([r for _, r in sorted(pair for part in parts for pair in part)])
        difference = max(difference, relative(ratios, ref_opt.last_trust_ratios))
    return difference


def zero_lamb_group(rank: int, world: int) -> float:
    return zero_against_one_process(FusedLAMB, LAMB, group=True)


def zero_lamb_local(rank: int, world: int) -> float:
    return zero_against_one_process(FusedLAMB, LAMB, group=False)


def zero_lamb_no_clipping(rank: int, world: int) -> float:
    options = {**LAMB, "max_grad_norm": None, "trust_clip": None}
    return zero_against_one_process(FusedLAMB, options, group=False)


def zero_extrap(rank: int, world: int) -> float:
    return zero_against_one_process(ExtrapSGD, {"lr": 0.05, "momentum": 0.9, "mode": "past"}, group=False)


def fsdp1_is_refused(rank: int, world: int) -> str:
    from torch.distributed.fsdp import FullyShardedDataParallel

    sharded = FullyShardedDataParallel(model(), device_id=torch.device("cpu"))
    try:
        FusedLAMB(sharded.parameters(), lr=0.01)
    except TypeError as err:
        return str(err)
    return "accepted"


CASES = [zero_lamb_group, zero_lamb_local, zero_lamb_no_clipping, zero_extrap, fsdp1_is_refused]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return run_cases(CASES, world_size=2, folder=tmp_path_factory.mktemp("sharded"))


def test_zero_with_clipping_equals_one_process_given_the_group(ranks):
    assert max(result(ranks, "zero_lamb_group")) < 1e-6


def test_zero_clips_by_its_own_part_without_the_group(ranks):
    """What ``grad_norm_group`` is for: each rank clipping by its partition's norm drifts."""
    assert min(result(ranks, "zero_lamb_local")) > 1e-6


def test_zero_without_clipping_and_extrap_sgd_need_no_group(ranks):
    assert max(result(ranks, "zero_lamb_no_clipping")) < 1e-6
    assert max(result(ranks, "zero_extrap")) < 1e-6


def test_fsdp1_flat_parameters_are_refused(ranks):
    for message in result(ranks, "fsdp1_is_refused"):
        assert "FSDP1 FlatParameter" in message and "fully_shard" in message


def test_grad_norm_group_is_checked():
    with pytest.raises(TypeError, match="grad_norm_group: expected a ProcessGroup"):
        FusedLAMB(model().parameters(), grad_norm_group="world")
    opt = FusedLAMB(model().parameters())
    assert copy.deepcopy(opt).grad_norm_group is None
