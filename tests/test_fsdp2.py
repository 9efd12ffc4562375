"""FusedLAMB and ExtrapSGD on FSDP2 (``fully_shard``) parameters, gloo on CPU, 2 and 3 ranks.

Each rank trains on its slice of every global batch; FSDP2 averages the gradients over the ranks, so the
parameters must follow one unsharded process trained on the whole batches: the trust ratios are taken
from the per-tensor norms summed over the shards, the clipping norm likewise. The layers' sizes split
unevenly, and on 3 ranks some shards are empty. The state checkpoint goes through
``torch.distributed.checkpoint`` from 2 ranks to 3.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from dist_helpers import result, run_cases
from torch import nn

from dynbatch_kernels.batching import (
    AnglePolicy,
    CABSPolicy,
    FixedPolicy,
    GradientAccumulator,
    NoiseScalePolicy,
)
from dynbatch_kernels.optim import ExtrapSGD, FusedLAMB

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

STEPS = 10
BATCH = 24  # split evenly over 2 and 3 ranks: the mean of the ranks' means is the batch mean
LAMB = {"lr": 0.02, "weight_decay": 0.01}
LAMB_CASES = {
    "plain": LAMB,
    "trust-clip": {**LAMB, "trust_clip": (0.0, 0.5)},
    "max-grad-norm": {**LAMB, "trust_clip": (0.1, 2.0), "max_grad_norm": 0.1},
}
EXTRAP = {"lr": 0.05, "momentum": 0.9, "mode": "past", "weight_decay": 1e-3}
#: Where the 2-rank run saves its checkpoint for the 3-rank run (set by the ``runs`` fixture).
CHECKPOINT = "DYNBATCH_TEST_CHECKPOINT"


def model() -> nn.Module:
    """Layer sizes 16, 12, 2 along dimension 0: shards of 8/8, 6/6, 1/1 on 2 ranks and 6/5/5, 4/4/4,
    1/1/0 on 3 (torch.chunk), so one shard of the last layer is empty."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 2))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(BATCH, 8, generator=gen), torch.randint(0, 2, (BATCH,), generator=gen)


def sharded_model(replicas: int = 1) -> nn.Module:
    """``fully_shard`` on every layer and the root; ``replicas > 1``: HSDP, the ranks split into that many
    replicas of a model sharded over the rest (placements ``(Replicate(), Shard(0))``)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    world = dist.get_world_size()
    if replicas == 1:
        mesh = init_device_mesh("cpu", (world,))
    else:
        mesh = init_device_mesh("cpu", (replicas, world // replicas), mesh_dim_names=("replicate", "shard"))
    net = model()
    for layer in net:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(net, mesh=mesh)


def train(net: nn.Module, opt: torch.optim.Optimizer, steps: range, rank: int = 0, world: int = 1) -> None:
    """Steps over the global batches ``steps``; each rank takes its contiguous slice."""
    for step in steps:
        x, y = batch(step)
        size = BATCH // world
        opt.zero_grad()
        part = slice(rank * size, (rank + 1) * size)
        nn.functional.cross_entropy(net(x[part]), y[part]).backward()
        opt.step()


def full(net: nn.Module) -> torch.Tensor:
    """Every parameter, whole (gathered from the shards), as one vector."""
    whole = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in net.parameters()]
    return torch.cat([p.detach().reshape(-1) for p in whole])


def against_one_process(make_opt, rank: int, world: int, replicas: int = 1) -> dict:
    """Parameters (and LAMB's trust ratios) after STEPS steps on FSDP2 (HSDP with ``replicas``) and on one
    process."""
    reference = model()
    ref_opt = make_opt(reference.parameters())
    train(reference, ref_opt, range(STEPS))
    net = sharded_model(replicas)
    opt = make_opt(net.parameters())
    train(net, opt, range(STEPS), rank, world)
    out = {"params": full(net), "expected": full(reference)}
    if isinstance(opt, FusedLAMB):
        out["ratios"], out["expected_ratios"] = opt.last_trust_ratios, ref_opt.last_trust_ratios
    return out


def lamb_plain(rank: int, world: int) -> dict:
    return against_one_process(lambda ps: FusedLAMB(ps, **LAMB_CASES["plain"]), rank, world)


def lamb_trust_clip(rank: int, world: int) -> dict:
    return against_one_process(lambda ps: FusedLAMB(ps, **LAMB_CASES["trust-clip"]), rank, world)


def lamb_max_grad_norm(rank: int, world: int) -> dict:
    return against_one_process(lambda ps: FusedLAMB(ps, **LAMB_CASES["max-grad-norm"]), rank, world)


def lamb_hsdp(rank: int, world: int) -> dict:
    """Every rank a replica (a shard group of one): the norms must not be summed over the replicas."""
    return against_one_process(lambda ps: FusedLAMB(ps, **LAMB_CASES["max-grad-norm"]), rank, world, world)


def extrap(rank: int, world: int) -> dict:
    return against_one_process(lambda ps: ExtrapSGD(ps, **EXTRAP), rank, world)


def state_is_sharded(rank: int, world: int) -> list[tuple]:
    """(global shape, local shape of the state, local shape of the parameter) of every exp_avg."""
    net = sharded_model()
    opt = FusedLAMB(net.parameters(), **LAMB)
    train(net, opt, range(1), rank, world)
    return [
        (
            type(s["exp_avg"]).__name__,
            tuple(s["exp_avg"].shape),
            tuple(s["exp_avg"].to_local().shape),
            tuple(p.to_local().shape),
        )
        for p, s in ((p, opt.state[p]) for p in net.parameters())
    ]


def refusals(rank: int, world: int) -> list[str]:
    """The errors for what cannot be summed exactly: a plain tensor among DTensors, grad_norm_group."""
    net = sharded_model()
    messages = []
    for make in (
        lambda: FusedLAMB([*net.parameters(), nn.Parameter(torch.ones(3))], **LAMB),
        lambda: FusedLAMB(net.parameters(), **LAMB, grad_norm_group=dist.group.WORLD).step(),
    ):
        try:
            make()
            messages.append("accepted")
        except (TypeError, ValueError) as err:
            messages.append(str(err))
    return messages


def checkpoint_make(rank: int, world: int) -> tuple[nn.Module, FusedLAMB]:
    net = sharded_model()
    return net, FusedLAMB(net.parameters(), **LAMB_CASES["max-grad-norm"])


def checkpoint_save(rank: int, world: int) -> torch.Tensor:
    """STEPS steps, a DCP checkpoint of model and optimizer, one more step: the parameters after it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    net, opt = checkpoint_make(rank, world)
    train(net, opt, range(STEPS), rank, world)
    model_state, optim_state = get_state_dict(net, opt)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=os.environ[CHECKPOINT])
    train(net, opt, range(STEPS, STEPS + 1), rank, world)
    return full(net)


def checkpoint_load(rank: int, world: int) -> torch.Tensor:
    """A fresh model and optimizer loading that checkpoint on this world size, then the same next step."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    net, opt = checkpoint_make(rank, world)
    model_state, optim_state = get_state_dict(net, opt)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=os.environ[CHECKPOINT])
    set_state_dict(net, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    train(net, opt, range(STEPS, STEPS + 1), rank, world)
    return full(net)


def load_unsharded(rank: int, world: int) -> dict:
    """One process's optimizer state_dict (whole tensors) loaded into FSDP2's: each rank takes its pieces;
    the next step equals that process's next step."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    make = lambda ps: FusedLAMB(ps, **LAMB_CASES["max-grad-norm"])
    reference = model()
    ref_opt = make(reference.parameters())
    train(reference, ref_opt, range(STEPS))
    net = sharded_model()
    set_model_state_dict(net, reference.state_dict(), options=StateDictOptions(full_state_dict=True))
    opt = make(net.parameters())
    opt.load_state_dict(ref_opt.state_dict())
    train(reference, ref_opt, range(STEPS, STEPS + 1))
    train(net, opt, range(STEPS, STEPS + 1), rank, world)
    return {"params": full(net), "expected": full(reference)}


ACC_ROUNDS = 24
ACC_OPTIMIZERS = {
    "fused-lamb": lambda ps: FusedLAMB(ps, **LAMB_CASES["max-grad-norm"]),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2),
}
ACC_POLICIES = {
    "fixed": lambda: FixedPolicy(3 * BATCH),
    "angle": lambda: AnglePolicy(groups="auto", max_samples=8 * BATCH, seed=3),
    "cabs": lambda: CABSPolicy(min_samples=2 * BATCH, max_samples=8 * BATCH, c=200.0),
    "noise": lambda: NoiseScalePolicy(min_samples=2 * BATCH, max_samples=8 * BATCH),
}


def accumulate(net, make_opt, policy, rank: int, world: int) -> tuple[torch.Tensor, list[tuple]]:
    """ACC_ROUNDS micro-batches (each rank its slice of every global one) through a GradientAccumulator:
    the parameters after them and every step's record."""
    acc = GradientAccumulator(make_opt(net.parameters()), policy, model=net)
    size = BATCH // world
    for k in range(ACC_ROUNDS):
        x, y = batch(1000 + k)
        part = slice(rank * size, (rank + 1) * size)
        loss = nn.functional.cross_entropy(net(x[part]), y[part])
        loss.backward()
        if acc.accumulate(size, loss.detach()):
            acc.step()
    records = [(r.micro_batches, r.samples, r.angles, r.trace, r.grad_sq, r.loss) for r in acc.history]
    return full(net), records


def accumulator(rank: int, world: int) -> dict:
    """Every optimizer with the fixed policy, AdamW with the adaptive ones: FSDP2 and one process."""
    runs = [(opt, "fixed") for opt in ACC_OPTIMIZERS] + [
        ("adamw", name) for name in ACC_POLICIES if name != "fixed"
    ]
    return {
        (opt, policy): (
            accumulate(sharded_model(), ACC_OPTIMIZERS[opt], ACC_POLICIES[policy](), rank, world),
            accumulate(model(), ACC_OPTIMIZERS[opt], ACC_POLICIES[policy](), 0, 1),
        )
        for opt, policy in runs
    }


def accumulator_uneven(rank: int, world: int) -> dict:
    """Micro-batches of different sizes on the ranks: refused on every rank (FSDP2 averages equally) and
    left out of the sum: a step after an even micro-batch equals a run that never saw the uneven one."""

    def run(uneven: bool) -> tuple[str, torch.Tensor]:
        net = sharded_model()
        acc = GradientAccumulator(torch.optim.SGD(net.parameters(), lr=0.5), FixedPolicy(8 * world))
        x, y = batch(0)
        message = "accepted"
        for n in ([4 + rank] if uneven else []) + [8, 8]:
            nn.functional.cross_entropy(net(x[:n]), y[:n]).backward()
            try:
                if acc.accumulate(n):
                    acc.step()
            except ValueError as err:
                message = str(err)
        return message, full(net)

    (message, params), (_, expected) = run(True), run(False)
    return {"message": message, "params": params, "expected": expected}


def example(rank: int, world: int) -> list[int]:
    """examples/fsdp2_accumulator.py's training loop, 60 micro-batches: the samples of its steps."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "examples" / "fsdp2_accumulator.py"
    spec = importlib.util.spec_from_file_location("fsdp2_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.train(rank, world, micro_batches=60)


CASES = [lamb_plain, lamb_trust_clip, lamb_max_grad_norm, lamb_hsdp, extrap, state_is_sharded, refusals]
CASES += [load_unsharded, accumulator, accumulator_uneven, example]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, list[dict]]:
    """Every case on 2 ranks, which then save a checkpoint, and on 3 ranks, which then load it."""
    os.environ[CHECKPOINT] = str(tmp_path_factory.mktemp("dcp") / "checkpoint")
    return {
        2: run_cases([*CASES, checkpoint_save], world_size=2, folder=tmp_path_factory.mktemp("fsdp2-2")),
        3: run_cases([*CASES, checkpoint_load], world_size=3, folder=tmp_path_factory.mktemp("fsdp2-3")),
    }


@pytest.fixture(params=(2, 3), ids=lambda w: f"world{w}")
def world(request) -> int:
    return request.param


@pytest.fixture
def ranks(world, runs) -> list[dict]:
    return runs[world]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize(
    "case", ["lamb_plain", "lamb_trust_clip", "lamb_max_grad_norm", "lamb_hsdp", "extrap"]
)
def test_fsdp2_equals_one_process(ranks, case):
    outs = result(ranks, case)
    for out in outs:
        assert relative(out["params"], out["expected"]) < 1e-6
        if "ratios" in out:
            assert relative(out["ratios"], out["expected_ratios"]) < 1e-6
            assert torch.equal(out["ratios"], outs[0]["ratios"])  # the same on every rank, bit for bit


def test_fsdp2_clipping_is_not_vacuous(ranks):
    """Some unclipped ratios exceed 0.5, which ``trust_clip=(0, 0.5)`` clips: that case tests clipping."""
    plain, clipped = result(ranks, "lamb_plain")[0], result(ranks, "lamb_trust_clip")[0]
    assert (plain["ratios"] > 0.5).any() and (clipped["ratios"] <= 0.5).all()


def test_fsdp2_state_is_sharded_like_the_parameters(ranks, world):
    empty = []
    for rows in result(ranks, "state_is_sharded"):
        for kind, _, local, param_local in rows:
            assert kind == "DTensor" and local == param_local
        empty.append(sum(1 for _, _, local, _ in rows if 0 in local))
    assert empty == ([0, 0, 2] if world == 3 else [0, 0])  # the last layer's weight and bias on rank 2


def test_fsdp2_refuses_what_it_cannot_sum(ranks):
    for mixed, group in result(ranks, "refusals"):
        assert "plain tensor among DTensor" in mixed
        assert "grad_norm_group: expected None with DTensor" in group


def test_unsharded_optimizer_state_loads_into_fsdp2(ranks):
    for out in result(ranks, "load_unsharded"):
        assert relative(out["params"], out["expected"]) < 1e-6


def test_dcp_checkpoint_from_2_ranks_resumes_on_3(runs):
    """The step after loading on 3 ranks equals the step after saving on 2."""
    continued = result(runs[2], "checkpoint_save")[0]
    for params in result(runs[3], "checkpoint_load"):
        assert relative(params, continued) < 1e-6


def test_accumulator_on_fsdp2_equals_one_process_on_the_whole_batches(ranks):
    """The fixed policy: parameters within 1e-6 and the same records; adaptive policies: the same
    decisions on every rank as one process (micro-batches and samples per step), statistics within 1e-6."""
    outs = result(ranks, "accumulator")
    for key in outs[0]:
        for (params, records), (expected, expected_records) in (out[key] for out in outs):
            assert (
                relative(params, expected) < 1e-5 if key[1] != "fixed" else relative(params, expected) < 1e-6
            )
            assert [r[:2] for r in records] == [r[:2] for r in expected_records], key
            assert len(records) >= 2, key
            for record, want in zip(records, expected_records):
                torch.testing.assert_close(
                    torch.tensor([*record[2], *record[3:]], dtype=torch.float64),
                    torch.tensor([*want[2], *want[3:]], dtype=torch.float64),
                    rtol=1e-5,
                    atol=1e-7,
                    equal_nan=True,
                )
        first = outs[0][key][0][1]
        assert all(out[key][0][1] == first for out in outs), key  # every rank decided alike, bit for bit


def test_accumulator_refuses_uneven_micro_batches_on_every_rank(ranks):
    for out in result(ranks, "accumulator_uneven"):
        assert "same micro-batch size on every rank under FSDP2" in out["message"]
        assert torch.equal(out["params"], out["expected"])  # the refused micro-batch left no trace


def test_the_fsdp2_example_steps_alike_on_every_rank(ranks):
    steps = result(ranks, "example")
    assert len(steps[0]) >= 2 and all(s == steps[0] for s in steps)
