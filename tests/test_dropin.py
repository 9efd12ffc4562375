"""Drop-in behaviour of FusedLAMB and ExtrapSGD: torch.optim semantics in anybody's training loop, and
nothing trains wrong in silence. Each numbered test is an item of the drop-in issue; every one checks the
torch-equivalent result (an optimizer built after the change, timm, a twin run), not just "no exception".
"""

from __future__ import annotations

import copy
import functools
import math
import pickle

import pytest
import torch
import torch.distributed as dist
from torch import nn

from dynbatch_kernels import FlatLayout, scans
from dynbatch_kernels.available import cpp_available
from dynbatch_kernels.optim import ExtrapSGD, FusedLAMB

MAKERS = {
    "lamb": lambda params, **kw: FusedLAMB(params, lr=0.02, trust_clip=(0.0, 1.0), **kw),
    "extrap-local": lambda params, **kw: ExtrapSGD(params, lr=0.1, weight_decay=1e-3, **kw),
    "extrap-past": lambda params, **kw: ExtrapSGD(params, lr=0.1, weight_decay=1e-3, mode="past", **kw),
}
every_optimizer = pytest.mark.parametrize("make", list(MAKERS.values()), ids=list(MAKERS))
BF16 = torch.bfloat16


def mlp(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).to(dtype)


def batches(count: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(6, 8, generator=gen), torch.randint(0, 4, (6,), generator=gen)) for _ in range(count)
    ]


def loss_of(model: nn.Module, batch, sign: float = 1.0) -> torch.Tensor:
    x, y = batch
    return sign * nn.functional.cross_entropy(model(x.to(next(model.parameters()).dtype)).float(), y)


def train(model: nn.Module, opt: torch.optim.Optimizer, data, zero=None, sign: float = 1.0) -> None:
    """One ``step(closure)`` per batch (ExtrapSGD's local mode calls the closure at w and at u)."""
    for batch in data:

        def closure(batch=batch):
            (zero or opt.zero_grad)()
            loss = loss_of(model, batch, sign)
            loss.backward()
            return loss

        opt.step(closure)


def params_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_same(model: nn.Module, expected) -> None:
    expected = expected.parameters() if isinstance(expected, nn.Module) else expected
    for (name, p), e in zip(model.named_parameters(), expected):
        assert torch.equal(p.detach(), e.detach()), name


@pytest.fixture(scope="module")
def process_group():
    """A one-process gloo group (DDP, ZeroRedundancyOptimizer, DTensor)."""
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


# ---- 1, 2: weights changed outside the optimizer ----


@every_optimizer
def test_1_assigned_data_trains_like_an_optimizer_built_after(make):
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(16, 8, generator=gen)
    model = mlp()
    opt = make(model.parameters())
    model[0].weight.data = weight.clone()
    fresh = mlp()
    fresh[0].weight.data = weight.clone()
    train(model, opt, batches(3))
    train(fresh, make(fresh.parameters()), batches(3))
    assert_same(model, fresh)


@pytest.mark.parametrize("dtype", [torch.float32, BF16], ids=str)
@pytest.mark.parametrize("make", [MAKERS["lamb"], MAKERS["extrap-local"]], ids=["lamb", "extrap-local"])
def test_1_assigned_data_between_steps_keeps_the_state(make, dtype):
    """As torch: ``p.data = x`` between steps continues from x with the optimizer state as it was."""
    model = mlp(dtype=dtype)
    opt = make(model.parameters())
    train(model, opt, batches(2))
    model[0].weight.data = torch.randn(16, 8, generator=torch.Generator().manual_seed(4)).to(dtype)
    twin = mlp(dtype=dtype)
    twin.load_state_dict(model.state_dict())
    twin_opt = make(twin.parameters())
    twin_opt.load_state_dict(opt.state_dict())
    before = model[0].weight.detach().clone()
    train(model, opt, batches(2, seed=5))
    train(twin, twin_opt, batches(2, seed=5))
    assert_same(model, twin)
    assert not torch.equal(model[0].weight.detach(), before)


def test_2_loaded_weights_are_followed_not_overwritten_by_the_master():
    """bfloat16 + float32 masters: model.load_state_dict after the optimizer is built, before the first
    step and between steps, trains like an optimizer built after it (keeping the state in the second case)."""
    model = mlp(dtype=BF16)
    opt = FusedLAMB(model.parameters(), lr=0.02)
    model.load_state_dict(mlp(seed=5, dtype=BF16).state_dict())
    fresh = mlp(seed=5, dtype=BF16)
    fresh_opt = FusedLAMB(fresh.parameters(), lr=0.02)
    train(model, opt, batches(2))
    train(fresh, fresh_opt, batches(2))
    assert_same(model, fresh)

    other = mlp(seed=9, dtype=BF16)
    model.load_state_dict(other.state_dict())
    twin = mlp(seed=9, dtype=BF16)
    twin_opt = FusedLAMB(twin.parameters(), lr=0.02)
    twin_opt.load_state_dict(opt.state_dict())  # the stale masters: followed because they differ
    train(model, opt, batches(1, seed=7))
    train(twin, twin_opt, batches(1, seed=7))
    assert_same(model, twin)
    moved = [
        (p.detach().float() - q.detach().float()).abs().max()
        for p, q in zip(model.parameters(), other.parameters())
    ]
    assert max(moved) < 0.1, "one step from the loaded weights, not back on the old trajectory"


def test_2_extrap_past_restarts_from_loaded_weights():
    """Past mode holds u between steps and keeps w as its state: weights loaded into the model between steps
    become the iterate (as under an optimizer built then), the momentum is kept."""
    make = MAKERS["extrap-past"]
    model = mlp()
    opt = make(model.parameters())
    train(model, opt, batches(2))
    model.load_state_dict(mlp(seed=9).state_dict())
    twin = mlp(seed=9)
    twin_opt = make(twin.parameters())
    twin_opt.load_state_dict(opt.state_dict())
    with torch.no_grad():
        for q in twin.parameters():
            twin_opt.state[q]["iterate"].copy_(q)
    train(model, opt, batches(2, seed=5))
    train(twin, twin_opt, batches(2, seed=5))
    assert_same(model, twin)


@pytest.mark.parametrize("layout", ["private", "bound"])
def test_2_own_writes_never_round_the_master(layout):
    """Updates below bfloat16's precision accumulate in the masters across steps (the optimizer's own
    scatter is not an outside change); an outside in-place change to one parameter is followed for that
    one only, although both parameters are views of one base (one version counter) or of the caller's
    layout."""
    base = torch.ones(128, dtype=BF16)
    a, b = nn.Parameter(base[:64]), nn.Parameter(base[64:])
    opt = FusedLAMB(
        [a, b], lr=1e-3, weight_decay=0.0, layout=FlatLayout([a, b]) if layout == "bound" else None
    )

    def step():
        a.grad, b.grad = torch.ones_like(a), torch.ones_like(b)
        opt.step()

    for _ in range(10):
        step()
    master = opt.state[a]["master_param"]  # re-synced from a rounded parameter it would stay at 1.0
    torch.testing.assert_close(master, torch.full((64,), 0.99), rtol=0, atol=1e-5)
    assert torch.equal(a.detach(), master.to(BF16))
    with torch.no_grad():
        b.fill_(3.0)
    step()
    torch.testing.assert_close(opt.state[a]["master_param"], torch.full((64,), 0.989), rtol=0, atol=1e-5)
    torch.testing.assert_close(opt.state[b]["master_param"], torch.full((64,), 2.999), rtol=0, atol=1e-5)


@pytest.mark.parametrize("order", ["model-first", "optimizer-first"])
@pytest.mark.parametrize("make", [MAKERS["lamb"], MAKERS["extrap-past"]], ids=["lamb", "extrap-past"])
def test_2_state_dict_round_trip_resumes_in_either_load_order(make, order):
    """A checkpoint's weights go with its state (masters, iterate): resuming is bit-identical whichever of
    the model and the optimizer is loaded first."""
    data = batches(6)
    model = mlp(dtype=BF16)
    opt = make(model.parameters())
    train(model, opt, data)
    expected = params_of(model)

    model = mlp(dtype=BF16)
    opt = make(model.parameters())
    train(model, opt, data[:3])
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
    model = mlp(seed=2, dtype=BF16)
    opt = make(model.parameters())
    loads = [lambda: model.load_state_dict(saved["model"]), lambda: opt.load_state_dict(saved["opt"])]
    for load in loads if order == "model-first" else loads[::-1]:
        load()
    train(model, opt, data[3:])
    assert_same(model, expected)


# ---- 5, 6, 7: gradients that are None, cleared by the model, or empty ----


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.trunk, self.head, self.unused = nn.Linear(8, 16), nn.Linear(16, 4), nn.Linear(16, 4)

    def forward(self, x):
        return self.head(torch.tanh(self.trunk(x)))


def test_5_parameters_without_gradient_are_skipped_like_timm():
    peers = pytest.importorskip("benchmarks.peers", reason="run from the repository root (python -m pytest)")
    try:
        timm_lamb = peers.timm_lamb()
    except ImportError as err:
        pytest.skip(f"timm's Lamb is not available: {err}")
    ours, theirs = Branchy(), Branchy()
    opt = FusedLAMB(ours.parameters(), lr=0.02, trust_clip=(0.0, 1.0), weight_decay=0.1)
    reference = timm_lamb(theirs.parameters(), lr=0.02, trust_clip=True, weight_decay=0.1, max_grad_norm=None)
    train(ours, opt, batches(3))
    train(theirs, reference, batches(3))
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6, msg=name)
    assert_same(ours.unused, Branchy().unused)
    for p in ours.unused.parameters():
        assert opt.state[p]["step"] == 0 and (opt.state[p]["exp_avg"] == 0).all()


@pytest.mark.parametrize("make", [MAKERS["extrap-local"], MAKERS["extrap-past"]], ids=["local", "past"])
def test_5_extrap_skips_parameters_without_gradient(make):
    """Weight decay would move the unused branch: it stays, momentum and step count untouched, and the rest
    trains exactly as without it."""
    ours, plain = Branchy(), Branchy()
    opt = make(ours.parameters())
    used = [p for n, p in plain.named_parameters() if not n.startswith("unused")]
    reference = make(used)
    train(ours, opt, batches(3))
    train(plain, reference, batches(3))
    assert_same(ours, plain)
    for p in ours.unused.parameters():
        assert opt.state[p]["step"] == 0 and (opt.state[p]["momentum_buffer"] == 0).all()


@every_optimizer
def test_6_model_zero_grad_just_works(make):
    """model.zero_grad() (gradients set to None) between steps trains exactly like zeroing in place."""
    cleared, zeroed = mlp(), mlp()
    opt_cleared, opt_zeroed = make(cleared.parameters()), make(zeroed.parameters())
    train(cleared, opt_cleared, batches(3), zero=cleared.zero_grad)
    train(zeroed, opt_zeroed, batches(3), zero=functools.partial(opt_zeroed.zero_grad, set_to_none=False))
    assert_same(cleared, zeroed)


def test_6_zero_grad_follows_torch():
    model = mlp()
    opt = FusedLAMB(model.parameters())
    loss_of(model, batches(1)[0]).backward()
    grads = [p.grad for p in model.parameters()]
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is g and (g == 0).all() for p, g in zip(model.parameters(), grads))
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


@every_optimizer
@pytest.mark.parametrize("grad", [None, "empty"])
def test_7_empty_parameter_beside_others(make, grad):
    model, plain = mlp(), mlp()
    empty = nn.Parameter(torch.empty(0))
    params = list(model.parameters())
    opt = make([*params[:2], empty, *params[2:]])
    reference = make(plain.parameters())

    def zero():
        opt.zero_grad()
        empty.grad = None if grad is None else torch.empty(0)

    train(model, opt, batches(3), zero=zero)
    train(plain, reference, batches(3))
    assert_same(model, plain)
    assert empty.shape == (0,)


# ---- 9: dtype and device changes, DDP bucket views, ZeroRedundancyOptimizer ----


@every_optimizer
@pytest.mark.parametrize("when", ["before", "between"])
@pytest.mark.parametrize("dtype", [torch.float16, BF16], ids=["half", "to-bfloat16"])
def test_9_model_cast_after_the_optimizer_is_built(make, when, dtype):
    """model.half() / .to(bfloat16) before the first step or between steps: the state is carried over
    (cast; a float32 master appears for FusedLAMB) exactly as loading it into an optimizer built on the
    cast model."""
    model = mlp()
    opt = make(model.parameters())
    train(model, opt, batches(2) if when == "between" else [])
    saved = copy.deepcopy(opt.state_dict())
    model.half() if dtype == torch.float16 else model.to(dtype)
    twin = copy.deepcopy(model)
    twin_opt = make(twin.parameters())
    twin_opt.load_state_dict(saved)
    train(model, opt, batches(2, seed=3))
    train(twin, twin_opt, batches(2, seed=3))
    assert_same(model, twin)
    assert all(
        opt.state[p][k].dtype == twin_opt.state[q][k].dtype
        for p, q in zip(model.parameters(), twin.parameters())
        for k in opt.state[p]
    )
    if isinstance(opt, FusedLAMB):
        assert all(opt.state[p]["master_param"].dtype == torch.float32 for p in model.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_9_model_moved_to_another_device():
    model, twin = mlp(), mlp()
    opt = FusedLAMB(model.parameters(), lr=0.02)
    train(model, opt, batches(2))
    saved = copy.deepcopy(opt.state_dict())
    model.cuda()
    twin.load_state_dict(model.state_dict())
    twin.cuda()
    twin_opt = FusedLAMB(twin.parameters(), lr=0.02)
    twin_opt.load_state_dict(saved)
    data = [(x.cuda(), y.cuda()) for x, y in batches(2, seed=3)]
    train(model, opt, data)
    train(twin, twin_opt, data)
    assert_same(model, twin)
    assert opt.layout.only().device.type == "cuda"


@pytest.mark.usefixtures("process_group")
def test_9_ddp_gradients_as_bucket_views():
    plain, wrapped = mlp(), mlp()
    ddp = nn.parallel.DistributedDataParallel(wrapped, gradient_as_bucket_view=True)
    opt_plain, opt_ddp = FusedLAMB(plain.parameters(), lr=0.02), FusedLAMB(ddp.parameters(), lr=0.02)
    train(plain, opt_plain, batches(3))
    train(ddp, opt_ddp, batches(3))
    assert_same(wrapped, plain)


@pytest.mark.usefixtures("process_group")
def test_9_zero_redundancy_optimizer_with_its_default_zero_grad():
    from torch.distributed.optim import ZeroRedundancyOptimizer

    plain, sharded = mlp(), mlp()
    opt_plain = FusedLAMB(plain.parameters(), lr=0.02)
    zero = ZeroRedundancyOptimizer(sharded.parameters(), optimizer_class=FusedLAMB, lr=0.02)
    train(plain, opt_plain, batches(3))
    train(sharded, zero, batches(3))
    assert_same(sharded, plain)


# ---- 10: copies ----

COPIERS = {"deepcopy": copy.deepcopy, "pickle": lambda obj: pickle.loads(pickle.dumps(obj))}


@every_optimizer
@pytest.mark.parametrize("copier", list(COPIERS.values()), ids=list(COPIERS))
def test_10_copies_step_like_the_original(make, copier):
    model = mlp(dtype=BF16)
    opt = make(model.parameters())
    train(model, opt, batches(2))
    model_copy, opt_copy = copier((model, opt))
    train(model, opt, batches(2, seed=3))
    train(model_copy, opt_copy, batches(2, seed=3))
    assert_same(model_copy, model)
    for p, q in zip(model.parameters(), model_copy.parameters()):
        assert all(torch.equal(opt.state[p][k], opt_copy.state[q][k]) for k in opt.state[p])


@pytest.mark.parametrize("copier", list(COPIERS.values()), ids=list(COPIERS))
def test_10_copy_between_extrapolate_and_step(copier):
    model = mlp()
    opt = ExtrapSGD(model.parameters(), lr=0.1)
    data = batches(2)
    loss_of(model, data[0]).backward()
    opt.extrapolate()
    model_copy, opt_copy = copier((model, opt))
    for m, o in ((model, opt), (model_copy, opt_copy)):
        loss_of(m, data[1]).backward()
        o.step()
    assert_same(model_copy, model)
    with opt.swap_to_iterate(), pytest.raises(RuntimeError, match="swap_to_iterate"):
        copier(opt)


# ---- the other torch.optim properties ----


@every_optimizer
@pytest.mark.parametrize(
    ("key", "value"), [("lr", math.nan), ("lr", -0.1), ("lr", math.inf), ("momentum", 1.5)]
)
def test_hyper_parameters_are_checked_at_every_step(make, key, value):
    model = mlp()
    opt = make(model.parameters())
    if key not in opt.param_groups[0]:
        key, value = "betas", (0.9, 1.5)  # FusedLAMB has no momentum
    train(model, opt, batches(1))
    before = params_of(model)
    opt.param_groups[0][key] = value
    with pytest.raises(ValueError, match=rf"^param_groups\[0\]\.{key}"):
        train(model, opt, batches(1))
    assert_same(model, before)


@pytest.mark.usefixtures("process_group")
@pytest.mark.parametrize("make", [MAKERS["lamb"], MAKERS["extrap-past"]], ids=["lamb", "extrap"])
def test_dtensor_parameters_step_like_plain_ones(make):
    """A one-rank mesh: the DTensor path (local shards, state as DTensors, the sums' all-reduce) gives the
    plain tensors' step bit for bit. Several ranks: tests/test_fsdp2.py."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (1,))
    plain = [nn.Parameter(torch.randn(5, 3)), nn.Parameter(torch.randn(7))]
    sharded = [nn.Parameter(distribute_tensor(p.detach().clone(), mesh, [Shard(0)])) for p in plain]
    opts = make(plain), make(sharded)
    for step in range(3):
        for p, q in zip(plain, sharded):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step))
            q.grad = distribute_tensor(p.grad.clone(), mesh, [Shard(0)])
        for opt in opts:
            opt.step()
    for p, q in zip(plain, sharded):
        assert torch.equal(p.detach(), q.to_local().detach())
        state = opts[1].state[q]
        assert all(isinstance(v, DTensor) for k, v in state.items() if k != "step")


@pytest.mark.usefixtures("process_group")
def test_a_bound_layout_refuses_dtensors():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    sharded = nn.Parameter(distribute_tensor(torch.randn(4, 4), init_device_mesh("cpu", (1,)), [Shard(0)]))
    with pytest.raises(TypeError, match=r"cannot be bound to a flat buffer \(bind=True\)"):
        FlatLayout([sharded])
    assert FlatLayout([sharded], bind=False).only().sharded


def test_complex_parameters_are_refused():
    for make in (MAKERS["lamb"], MAKERS["extrap-local"]):
        with pytest.raises(TypeError, match="complex parameters are not supported"):
            make([nn.Parameter(torch.randn(3, dtype=torch.complex64))])


@every_optimizer
def test_maximize_ascends_like_minimizing_the_negation(make):
    up, down = mlp(), mlp()
    train(up, make(up.parameters(), maximize=True), batches(3))
    train(down, make(down.parameters()), batches(3), sign=-1.0)
    assert_same(up, down)


def test_maximize_leaves_the_callers_gradient_views_as_they_were():
    model = mlp()
    layout = FlatLayout(model.parameters())
    opt = ExtrapSGD(model.parameters(), lr=0.1, mode="past", maximize=True, layout=layout)
    loss_of(model, batches(1)[0]).backward()
    grads = layout.only().grad.clone()
    opt.step()
    layout.check_grads()
    assert torch.equal(layout.only().grad, grads)


def rosenbrock(xy: torch.Tensor) -> torch.Tensor:
    x, y = xy
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


@pytest.mark.parametrize("trust_clip", [None, (0.0, 1.0)], ids=["lamb", "lambc"])
def test_rosenbrock_with_a_closure_assigning_grad(trust_clip):
    """timm's optimizer test (its create_optimizer_v2 defaults: no weight decay, max_grad_norm 1.0): cyclic
    coordinate descent on Rosenbrock, the closure assigning a new ``p.grad``; it must get closer to the
    minimum, and follows timm's trajectory."""
    peers = pytest.importorskip("benchmarks.peers", reason="run from the repository root (python -m pytest)")

    def descend(make) -> torch.Tensor:
        xy = torch.tensor([1.5, 1.5], requires_grad=True)
        opt = make([xy])

        def closure(coordinate: int) -> torch.Tensor:
            opt.zero_grad()
            loss = rosenbrock(xy)
            loss.backward()
            mask = torch.zeros(2)
            mask[coordinate] = 1.0
            xy.grad = xy.grad * mask
            return loss

        for i in range(1000):
            opt.step(functools.partial(closure, i % 2))
        return xy.detach()

    options = {"lr": 1e-3, "weight_decay": 0.0}
    ours = descend(lambda ps: FusedLAMB(ps, trust_clip=trust_clip, max_grad_norm=1.0, **options))
    assert ours.dist(torch.ones(2)) < torch.tensor([1.5, 1.5]).dist(torch.ones(2))
    try:
        timm_lamb = peers.timm_lamb()
    except ImportError:
        return
    theirs = descend(lambda ps: timm_lamb(ps, trust_clip=trust_clip is not None, **options))
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


@every_optimizer
def test_step_hooks(make):
    model = mlp()
    opt = make(model.parameters())
    seen = []
    opt.register_step_pre_hook(lambda o, args, kwargs: seen.append(("pre", params_of(model))))
    opt.register_step_post_hook(lambda o, args, kwargs: seen.append(("post", params_of(model))))
    train(model, opt, batches(2))
    assert [kind for kind, _ in seen] == ["pre", "post"] * 2
    assert not torch.equal(seen[0][1][0], seen[1][1][0]), "the post hook sees the updated parameters"
    assert all(torch.equal(a, b) for a, b in zip(seen[-1][1], model.parameters()))


@every_optimizer
def test_add_param_group_to_a_private_layout(make):
    model, twin = mlp(), mlp()
    pointers = [p.data_ptr() for p in model.parameters()]
    opt = make(model[0].parameters())
    reference = make(twin[0].parameters())
    train(model, opt, batches(1))
    train(twin, reference, batches(1))
    before = opt.layout
    for o, m in ((opt, model), (reference, twin)):
        o.add_param_group({"params": list(m[2].parameters()), "lr": 0.05})
    assert opt.layout is not before and len(opt.layout.params) == 4
    train(model, opt, batches(2, seed=4))
    train(twin, reference, batches(2, seed=4))
    assert_same(model, twin)
    assert [p.data_ptr() for p in model.parameters()] == pointers
    assert not torch.equal(model[2].weight.detach(), mlp()[2].weight.detach())


@every_optimizer
def test_frozen_parameters_are_untouched(make):
    model, plain = mlp(), mlp()
    model[0].bias.requires_grad_(False)
    opt = make(model.parameters())
    reference = make([p for n, p in plain.named_parameters() if n != "0.bias"])
    plain[0].bias.requires_grad_(False)
    train(model, opt, batches(3))
    train(plain, reference, batches(3))
    assert_same(model, plain)
    assert (
        torch.equal(model[0].bias.detach(), mlp()[0].bias.detach()) and opt.state[model[0].bias]["step"] == 0
    )


@every_optimizer
def test_a_tensor_listed_twice_in_a_group_warns_like_torch_and_is_optimized_once(make):
    model, twin = mlp(), mlp()
    params = list(model.parameters())
    with pytest.warns(UserWarning, match="duplicate parameters"):
        opt = make([{"params": [*params, params[0]]}])
    train(model, opt, batches(3))
    train(twin, make(twin.parameters()), batches(3))
    assert_same(model, twin)


@every_optimizer
def test_a_multi_element_tensor_lr_is_a_value_error_like_torch(make):
    with pytest.raises(ValueError, match="lr: expected a 1-element tensor"):
        make([{"params": list(mlp().parameters()), "lr": torch.tensor([0.1, 0.2])}])


@pytest.mark.skipif(not cpp_available(), reason="extension not built")
def test_parameter_scans_in_cpp_equal_pythons():
    """The per-step scans over every parameter (``dynbatch_kernels.scans``) done in C++ give what their
    Python versions give: marks after an assignment through ``p.data``, an in-place op and on a
    non-contiguous view; gradients that are None, frozen parameters, a Parameter subclass; misfits by
    contiguity and by address (empty tensors fit anywhere). What is not a tensor is a TypeError."""
    from dynbatch_kernels import _C

    class Tagged(torch.nn.Parameter):
        pass

    params = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(4)] + [Tagged(torch.randn(2))]
    params[1].data = torch.zeros(7)
    with torch.no_grad():
        params[2].mul_(2)
    params[0].grad = torch.randn(3, 5).t()
    params[4].grad = torch.ones(2)
    params[3].requires_grad_(False)
    tensors = [*params, params[0].t(), torch.empty(0)]
    assert _C.tensor_marks(tensors) == scans._tensor_marks(tensors)
    grads, missing, frozen = _C.grads_of(params)
    assert (grads, missing, frozen) == scans._grads_of(params)
    assert grads[0] is params[0].grad and grads[4] is params[4].grad and (missing, frozen) == ([1, 2, 3], [3])
    with_none = [*tensors[:3], None, *tensors[3:]]
    starts = [t.data_ptr() if t is not None else 0 for t in with_none]
    starts[1] += 4
    starts[-1] += 4
    for where in (None, starts):
        assert _C.misfits(with_none, where) == scans._misfits(with_none, where)
    assert _C.misfits(with_none, None) == [3, 6] and _C.misfits(with_none, starts) == [1, 3]
    not_tensors = ((_C.tensor_marks, ([params[0], 3],)), (_C.grads_of, ([3],)), (_C.misfits, ([3], None)))
    for scan, args in not_tensors:
        with pytest.raises(TypeError, match=r"expected a list of tensors, got an item of type int"):
            scan(*args)
    with pytest.raises(ValueError, match=r"starts: expected 2 addresses \(one per tensor\), got 1"):
        _C.misfits(params[:2], [0])


@pytest.mark.skipif(not cpp_available(), reason="extension not built")
def test_parameter_scans_in_cpp_survive_python_run_during_the_scan():
    """A subclass's ``grad`` property runs Python in the middle of the C++ scan: one that empties the list
    being scanned leaves the scan reading what it was given, one that raises has its error propagated,
    and an object that only claims ``torch.Tensor`` as its class is a TypeError, not unpacked. The lists
    are long enough for every prefetch stage to run, from before the first item."""
    from unittest import mock

    from dynbatch_kernels import _C

    owners: list[torch.Tensor] = []

    class Clearing(torch.nn.Parameter):
        @property
        def grad(self):
            owners.clear()
            _ = [object() for _ in range(10_000)]
            return None

    class Raising(torch.nn.Parameter):
        @property
        def grad(self):
            raise RuntimeError("grad property failed")

    plain = [torch.nn.Parameter(torch.randn(3)) for _ in range(40)]
    for p in plain[::3]:
        p.grad = torch.randn(3)
    owners.extend([Clearing(torch.randn(2)), *plain])
    scanned = list(owners)
    grads, missing, _ = _C.grads_of(owners)
    assert owners == [] and len(grads) == 41 and grads[1] is plain[0].grad
    assert missing == [0, *(j + 1 for j in range(40) if j % 3)]
    assert _C.tensor_marks(scanned) == scans._tensor_marks(scanned)
    with pytest.raises(RuntimeError, match="grad property failed"):
        _C.grads_of([*plain, Raising(torch.randn(2))])
    fake = mock.Mock(spec=torch.Tensor)
    assert isinstance(fake, torch.Tensor)
    for scan, args in ((_C.tensor_marks, ([fake],)), (_C.grads_of, ([fake],)), (_C.misfits, ([fake], None))):
        with pytest.raises(TypeError, match="got an item of type Mock"):
            scan(*args)
