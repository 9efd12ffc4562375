"""FusedLAMB as a torch.optim.Optimizer: against a float64 step-by-step oracle and timm's Lamb, resume,
state_dict, GradScaler, master weights, param groups, validation."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from lamb_cases import Float64Lamb, bf16_rtol, random_options

from dynbatch_kernels import FlatLayout
from dynbatch_kernels.optim import FusedLAMB
from helpers import backend_cases

SHAPES = [(7,), (3, 5), (1,), (13, 11), (2, 2, 3), (29,)]


def make_params(gen: torch.Generator, dtype=torch.float32) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.randn(shape, generator=gen).to(dtype)) for shape in SHAPES]


def three_groups(params, gen: torch.Generator) -> list[dict]:
    """Random options, with every branch forced somewhere: LAMBC + clipping, always_adapt without weight
    decay, a non-adapted group without bias correction."""
    fixed = [
        {"trust_clip": (0.0, 1.0), "max_grad_norm": 0.5, "weight_decay": 0.05},
        {"weight_decay": 0.0, "always_adapt": True, "trust_clip": None},
        {"weight_decay": 0.0, "always_adapt": False, "bias_correction": False},
    ]
    return [{"params": params[k::3], **random_options(gen, **fixed[k])} for k in range(3)]


def oracle_options(optimizer: FusedLAMB, params) -> list[dict]:
    """Each parameter's group options as the optimizer holds them now (schedulers change them)."""
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    return [group_of[id(p)] for p in params]


def set_grads(params, gen: torch.Generator, scale: float = 1.0) -> list[torch.Tensor]:
    """Random gradients, written into a caller layout's views where they are, else as fresh tensors."""
    grads = [torch.randn(p.shape, generator=gen) * scale for p in params]
    for p, g in zip(params, grads):
        if p.grad is None:
            p.grad = g.to(p)
        else:
            p.grad.copy_(g)
    return grads


@pytest.mark.parametrize("backend", backend_cases(), indirect=True)
@pytest.mark.parametrize("bind", [True, False], ids=["bound", "copied"])
def test_ten_steps_match_float64_oracle(backend, bind):
    """Three groups with random options, odd sizes, an LR schedule changing lr every step, a caller layout
    (binding the parameters and gradients, or gathering and scattering them)."""
    gen = torch.Generator().manual_seed(21)
    params = [torch.nn.Parameter(p.detach().to(backend)) for p in make_params(gen)]
    oracle = Float64Lamb(params)
    layout = FlatLayout(params, chunk_size=32, bind=bind)
    optimizer = FusedLAMB(three_groups(params, gen), layout=layout)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 1.0 / (1 + 0.3 * t))
    for _ in range(10):
        grads = set_grads(params, gen)
        oracle.step(grads, oracle_options(optimizer, params))
        optimizer.step()
        schedule.step()
    for p, w in zip(params, oracle.w):
        torch.testing.assert_close(p.detach().cpu().double(), w, rtol=1e-5, atol=1e-6)
    ratios = optimizer.last_trust_ratios.cpu().double()
    torch.testing.assert_close(ratios, torch.tensor(oracle.ratios, dtype=torch.float64), rtol=1e-5, atol=0)
    assert optimizer.last_grad_sq_norm is not None
    for p, m in zip(params, oracle.m):
        torch.testing.assert_close(optimizer.state[p]["exp_avg"].cpu().double(), m, rtol=1e-5, atol=1e-7)
        assert optimizer.state[p]["step"].item() == 10


@pytest.mark.parametrize("backend", backend_cases(), indirect=True)
def test_mixed_dtypes_share_one_global_norm(backend):
    """float32 and bfloat16 parameters (two flat buffers, a master copy for bfloat16) clipped by one norm."""
    gen = torch.Generator().manual_seed(8)
    params = [
        torch.nn.Parameter(p.detach().to(device=backend, dtype=dtype))
        for p, dtype in zip(make_params(gen), [torch.float32, torch.bfloat16] * 3)
    ]
    oracle = Float64Lamb(params)
    optimizer = FusedLAMB(params, lr=0.02, max_grad_norm=1.0, layout=FlatLayout(params, chunk_size=32))
    assert len(optimizer.layout.buffers) == 2
    for _ in range(4):
        grads = [g.to(p.dtype).double() for g, p in zip(set_grads(params, gen), params)]
        oracle.step(grads, oracle_options(optimizer, params))
        optimizer.step()
    for p, w in zip(params, oracle.w):
        state = optimizer.state[p]
        if p.dtype == torch.bfloat16:
            assert state["master_param"].dtype == torch.float32
            rtol = bf16_rtol(backend)
            torch.testing.assert_close(p.detach().float(), state["master_param"], rtol=rtol, atol=0)
            # u is held in bfloat16 between the passes: a relative rounding of each of the 4 updates of size
            # lr * r * |u| (r * |u| < 4 here)
            atol = 4 * 0.02 * 4 * rtol
            torch.testing.assert_close(state["master_param"].cpu().double(), w, rtol=0, atol=atol)
        else:
            assert "master_param" not in state
            torch.testing.assert_close(p.detach().cpu().double(), w, rtol=1e-5, atol=1e-6)


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 6, 3),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(6 * 6 * 6, 32),
        torch.nn.LayerNorm(32),
        torch.nn.GELU(),
        torch.nn.Linear(32, 10),
    )


def decay_groups(model: torch.nn.Module, **options) -> list[dict]:
    """The usual split: weight decay on matrices and kernels, none on biases and norms."""
    named = list(model.named_parameters())
    return [
        {"params": [p for _, p in named if p.dim() > 1], **options},
        {"params": [p for _, p in named if p.dim() <= 1], "weight_decay": 0.0},
    ]


def train(model, optimizer, steps: int, seed: int, scaler=None) -> list[float]:
    """``steps`` optimizer steps on random batches (inputs in the model's dtype, the loss in float32)."""
    gen = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    losses = []
    for _ in range(steps):
        x, y = torch.randn(16, 1, 8, 8, generator=gen).to(dtype), torch.randint(0, 10, (16,), generator=gen)
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("max_grad_norm", [None, 1.0])
def test_matches_timm_lamb(max_grad_norm):
    """timm's Lamb(trust_clip=True) and FusedLAMB(trust_clip=(0, 1)), same defaults, on a real small model."""
    peers = pytest.importorskip("benchmarks.peers", reason="run from the repository root (python -m pytest)")
    try:
        timm_lamb = peers.timm_lamb()
    except ImportError as err:
        pytest.skip(f"timm's Lamb is not available: {err}")
    ours, theirs = small_model(), small_model()
    reference = timm_lamb(decay_groups(theirs), lr=0.01, trust_clip=True, max_grad_norm=max_grad_norm)
    fused = FusedLAMB(decay_groups(ours), lr=0.01, trust_clip=(0.0, 1.0), max_grad_norm=max_grad_norm)
    losses = [train(model, opt, 10, seed=3) for model, opt in ((theirs, reference), (ours, fused))]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=0)
    for (name, a), b in zip(theirs.named_parameters(), ours.parameters()):
        torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-5, atol=1e-6, msg=name)
    ratios = fused.last_trust_ratios
    assert ((ratios > 0) & (ratios <= 1)).all() and (ratios < 1).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_resume_is_bit_identical(dtype):
    """Save model + optimizer + scheduler mid-training, load into fresh ones: identical to no interruption."""

    def fresh():
        model = small_model().to(dtype)
        optimizer = FusedLAMB(decay_groups(model, trust_clip=(0.01, 10.0)), lr=0.01, max_grad_norm=2.0)
        schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
        return model, optimizer, schedule

    def run(model, optimizer, schedule, steps, seed):
        for k in range(steps):
            train(model, optimizer, 1, seed=seed + k)
            schedule.step()

    model, optimizer, schedule = fresh()
    run(model, optimizer, schedule, 6, seed=0)
    expected = [p.detach().clone() for p in model.parameters()]

    model, optimizer, schedule = fresh()
    run(model, optimizer, schedule, 3, seed=0)
    checkpoint = io.BytesIO()
    torch.save(
        {"model": model.state_dict(), "opt": optimizer.state_dict(), "lr": schedule.state_dict()}, checkpoint
    )
    checkpoint.seek(0)
    saved = torch.load(checkpoint)
    model, optimizer, schedule = fresh()
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["opt"])
    schedule.load_state_dict(saved["lr"])
    run(model, optimizer, schedule, 3, seed=3)
    for p, e in zip(model.parameters(), expected):
        assert torch.equal(p.detach(), e)


def test_state_dict_round_trip_is_exact():
    model = small_model().to(torch.bfloat16)
    optimizer = FusedLAMB(decay_groups(model, trust_clip=(0.0, 1.0)), lr=0.01)
    train(model, optimizer, 2, seed=0)
    saved = copy.deepcopy(optimizer.state_dict())
    entry = saved["state"][0]
    assert set(entry) == {"step", "exp_avg", "exp_avg_sq", "master_param"}
    assert all(entry[k].dtype == torch.float32 for k in entry) and entry["step"].item() == 2

    other = small_model().to(torch.bfloat16)
    loaded = FusedLAMB(decay_groups(other), lr=0.5, weight_decay=0.3)
    loaded.load_state_dict(saved)
    again = loaded.state_dict()
    assert again["param_groups"] == saved["param_groups"]
    for pid, state in saved["state"].items():
        for key, value in state.items():
            assert torch.equal(again["state"][pid][key], value), (pid, key)


def test_load_state_dict_checks_before_writing():
    model = small_model()
    optimizer = FusedLAMB(decay_groups(model), lr=0.01)
    train(model, optimizer, 1, seed=0)
    saved = copy.deepcopy(optimizer.state_dict())
    before = copy.deepcopy(optimizer.state_dict())
    broken = copy.deepcopy(saved)
    broken["state"][len(broken["state"]) - 1]["exp_avg"] = torch.zeros(3)
    with pytest.raises(ValueError, match="exp_avg"):
        optimizer.load_state_dict(broken)
    broken = copy.deepcopy(saved)
    broken["param_groups"][1]["betas"] = (0.9, 1.5)
    with pytest.raises(ValueError, match=r"betas\[1\]"):
        optimizer.load_state_dict(broken)
    with pytest.raises(ValueError, match="param groups"):
        optimizer.load_state_dict({**saved, "param_groups": saved["param_groups"][:1]})
    after = optimizer.state_dict()
    for pid, state in before["state"].items():
        assert all(torch.equal(after["state"][pid][k], v) for k, v in state.items())


def test_grad_scaler_applies_inverse_scale_and_skips_overflow():
    """Power-of-two loss scales cancel exactly: the scaled run equals the unscaled one bit for bit; a step
    with an inf gradient changes nothing (parameters, state, step counts) and halves the scale."""
    plain_model, scaled_model = small_model(), small_model()
    plain = FusedLAMB(decay_groups(plain_model, trust_clip=(0.0, 1.0)), lr=0.01, max_grad_norm=1.0)
    scaled = FusedLAMB(decay_groups(scaled_model, trust_clip=(0.0, 1.0)), lr=0.01, max_grad_norm=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=1000)
    train(plain_model, plain, 2, seed=0)
    train(scaled_model, scaled, 2, seed=0, scaler=scaler)
    for a, b in zip(plain_model.parameters(), scaled_model.parameters()):
        assert torch.equal(a, b)

    before = {
        "params": [p.detach().clone() for p in scaled_model.parameters()],
        "state": copy.deepcopy(scaled.state_dict()["state"]),
    }
    scaled.zero_grad()
    x = torch.randn(4, 1, 8, 8)
    scaler.scale(scaled_model(x).sum()).backward()
    next(scaled_model.parameters()).grad.view(-1)[0] = float("inf")
    scaler.step(scaled)
    scaler.update()
    assert scaler.get_scale() == 2.0**11
    for p, b in zip(scaled_model.parameters(), before["params"]):
        assert torch.equal(p.detach(), b)
    for pid, state in scaled.state_dict()["state"].items():
        assert all(torch.equal(v, before["state"][pid][k]) for k, v in state.items())


def test_nonfinite_gradient_skips_step_when_clipping():
    """Without a GradScaler, the global-norm pass of max_grad_norm doubles as the overflow check."""
    model = small_model()
    optimizer = FusedLAMB(decay_groups(model), max_grad_norm=1.0)
    train(model, optimizer, 1, seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    steps = [optimizer.state[p]["step"].item() for p in model.parameters()]
    optimizer.zero_grad()
    model(torch.randn(2, 1, 8, 8)).sum().backward()
    next(model.parameters()).grad.view(-1)[3] = float("nan")
    optimizer.step()
    assert not math.isfinite(optimizer.last_grad_sq_norm.item())
    assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))
    assert steps == [optimizer.state[p]["step"].item() for p in model.parameters()]


def test_grad_sq_norm_from_an_earlier_reduction():
    """step(grad_sq_norm=...) replaces the measuring pass: the value measured there gives the same step."""
    models = [small_model(), small_model()]
    optimizers = [FusedLAMB(m.parameters(), lr=0.01, max_grad_norm=0.5) for m in models]
    x = torch.randn(8, 1, 8, 8)
    for model in models:
        model(x).square().mean().backward()
    expected = sum(p.grad.double().square().sum() for p in models[0].parameters())
    optimizers[0].step()
    measured = optimizers[0].last_grad_sq_norm
    torch.testing.assert_close(measured.double(), expected, rtol=1e-6, atol=0)
    optimizers[1].step(grad_sq_norm=measured.clone())
    for a, b in zip(*(m.parameters() for m in models)):
        assert torch.equal(a, b)


def test_master_weights_keep_updates_below_bfloat16_precision():
    """|lr * u| = 1e-3 < half an ulp of 1.0 in bfloat16 (2**-8): lost without a master copy, kept with one."""
    params = {flag: torch.nn.Parameter(torch.ones(64, dtype=torch.bfloat16)) for flag in (True, False)}
    optimizers = {
        flag: FusedLAMB([p], lr=1e-3, weight_decay=0.0, master_weights=flag) for flag, p in params.items()
    }
    for _ in range(10):
        for flag, p in params.items():
            p.grad = torch.ones_like(p)
            optimizers[flag].step()
    assert torch.equal(params[False].detach(), torch.ones(64, dtype=torch.bfloat16))
    master = optimizers[True].state[params[True]]["master_param"]
    torch.testing.assert_close(master, torch.full((64,), 0.99), rtol=0, atol=1e-5)
    assert torch.equal(params[True].detach(), master.to(torch.bfloat16))


def test_frozen_and_foreign_parameters_are_untouched():
    """A parameter with requires_grad=False, and one in the caller's layout but not in the optimizer."""
    gen = torch.Generator().manual_seed(1)
    params = make_params(gen)
    layout = FlatLayout(params)
    frozen, foreign = params[1], params[2]
    optimizer = FusedLAMB([p for p in params if p is not foreign], lr=0.05, layout=layout)
    frozen.requires_grad_(False)
    before = [p.detach().clone() for p in params]
    for _ in range(3):
        set_grads(params, gen)
        optimizer.step()
    assert torch.equal(frozen, before[1]) and torch.equal(foreign, before[2])
    assert not torch.equal(params[0], before[0])
    assert foreign not in optimizer.state and optimizer.state[frozen]["step"].item() == 0
    assert (optimizer.state[frozen]["exp_avg"] == 0).all()
    with pytest.raises(ValueError, match="layout"):
        FusedLAMB([torch.nn.Parameter(torch.ones(3))], layout=layout)
    with pytest.raises(ValueError, match="layout"):
        optimizer.add_param_group({"params": [torch.nn.Parameter(torch.ones(3))]})
    assert len(optimizer.param_groups) == 1
    # adding the foreign parameter activates its segment in the caller's layout; other state is kept
    exp_avg = optimizer.state[params[0]]["exp_avg"].clone()
    optimizer.add_param_group({"params": [foreign], "lr": 0.01})
    assert optimizer.layout is layout and torch.equal(optimizer.state[params[0]]["exp_avg"], exp_avg)
    set_grads(params, gen)
    optimizer.step()
    assert not torch.equal(foreign, before[2]) and optimizer.state[foreign]["step"].item() == 1
    assert optimizer.state[params[0]]["step"].item() == 4


def test_add_param_group_keeps_state_and_matches_oracle():
    """A group added after two steps: the owned layout is rebuilt over all parameters, state carried over."""
    gen = torch.Generator().manual_seed(5)
    first, second = make_params(gen)[:3], make_params(gen)[3:]
    oracle_first, oracle_second = Float64Lamb(first), Float64Lamb(second)
    optimizer = FusedLAMB(first, lr=0.02, trust_clip=(0.0, 1.0))
    for _ in range(2):
        oracle_first.step(set_grads(first, gen), oracle_options(optimizer, first))
        optimizer.step()
    old_buffer = optimizer.layout.only().data
    optimizer.add_param_group({"params": second, "lr": 0.03, "weight_decay": 0.0, "always_adapt": True})
    assert optimizer.layout.only().data is not old_buffer and len(optimizer.layout.params) == 6
    for _ in range(3):
        oracle_first.step(set_grads(first, gen), oracle_options(optimizer, first))
        oracle_second.step(set_grads(second, gen), oracle_options(optimizer, second))
        optimizer.step()
    for p, w in zip(first + second, oracle_first.w + oracle_second.w):
        torch.testing.assert_close(p.detach().double(), w, rtol=1e-5, atol=1e-6)
    assert [optimizer.state[p]["step"].item() for p in first + second] == [5] * 3 + [3] * 3


def test_private_layout_leaves_user_tensors_and_names_ratios():
    """The default layout is private: p.data and p.grad stay the user's, p.grad keeps the gradient (not u)."""
    model = small_model()
    pointers = [p.data_ptr() for p in model.parameters()]
    optimizer = FusedLAMB(model.parameters())

    def closure():
        optimizer.zero_grad()
        loss = model(torch.randn(2, 1, 8, 8)).sum()
        loss.backward()
        return loss

    loss = optimizer.step(closure)
    assert loss.ndim == 0
    grads = [p.grad.clone() for p in model.parameters()]
    assert [p.data_ptr() for p in model.parameters()] == pointers
    assert all(not optimizer.layout.only().data_is_view(j) for j in range(len(pointers)))
    optimizer.step()  # the same gradients again: they were not overwritten by the first step's u
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert set(optimizer.named_trust_ratios()) == {f"group0.param{i}" for i in range(len(pointers))}


BAD_OPTIONS = {
    "negative-lr": ({"lr": -1e-3}, ValueError, "lr"),
    "beta1-one": ({"betas": (1.0, 0.999)}, ValueError, r"betas\[0\]"),
    "beta2-negative": ({"betas": (0.9, -0.1)}, ValueError, r"betas\[1\]"),
    "betas-not-pair": ({"betas": 0.9}, TypeError, "betas"),
    "trust-clip-min-above-max": ({"trust_clip": (1.0, 0.5)}, ValueError, r"trust_clip\[1\]"),
    "trust-clip-negative": ({"trust_clip": (-0.1, 1.0)}, ValueError, r"trust_clip\[0\]"),
    "negative-eps": ({"eps": -1e-8}, ValueError, "eps"),
    "negative-weight-decay": ({"weight_decay": -0.01}, ValueError, "weight_decay"),
    "zero-max-grad-norm": ({"max_grad_norm": 0.0}, ValueError, "max_grad_norm"),
    "always-adapt-str": ({"always_adapt": "yes"}, TypeError, "always_adapt"),
}


@pytest.mark.parametrize("where", ["defaults", "group"])
@pytest.mark.parametrize("case", list(BAD_OPTIONS))
def test_bad_hyperparameters_raise_before_allocation(case, where):
    options, error, word = BAD_OPTIONS[case]
    params = make_params(torch.Generator().manual_seed(0))
    pointers = [p.data_ptr() for p in params]
    if where == "defaults":
        with pytest.raises(error, match=f"^{word}"):
            FusedLAMB(params, **options)
    else:
        with pytest.raises(error, match=rf"^param_groups\[1\]\.{word}"):
            FusedLAMB([{"params": params[:2]}, {"params": params[2:], **options}])
    assert [p.data_ptr() for p in params] == pointers, "a layout was built before the error"
    assert all(p.grad is None for p in params)
