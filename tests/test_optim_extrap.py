"""ExtrapSGD: both modes against float64 step-by-step references, state_dict round trips, error paths."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from dynbatch_kernels import FlatLayout
from dynbatch_kernels.optim import ExtrapSGD
from helpers import backend_cases

STEPS = 10


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3)).to(dtype)


def batches(count: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)) for _ in range(count)
    ]


def loss_of(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    like = next(model.parameters())
    return nn.functional.cross_entropy(model(x.to(like)).float(), y.to(like.device))


def groups(model: nn.Module) -> list[dict]:
    """Weights: Nesterov with weight decay, extrapolation lr following lr; biases: heavy ball, fixed gamma."""
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return [
        {"params": weights, "lr": 0.2, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
        {"params": biases, "lr": 0.1, "momentum": 0.5, "nesterov": False, "extrapolation_lr": 0.3},
    ]


class Reference:
    """ExtrapSGD's docstring update, per parameter in float64 with autograd (independent of the ops)."""

    def __init__(self, model: nn.Module, spec: list[dict], mode: str):
        self.model = copy.deepcopy(model).double().cpu()
        names = {id(p): n for n, p in model.named_parameters()}
        own = dict(self.model.named_parameters())
        self.groups = [
            {
                **{k: v for k, v in g.items() if k != "params"},
                "params": [own[names[id(p)]] for p in g["params"]],
            }
            for g in spec
        ]
        for g in self.groups:
            g.setdefault("weight_decay", 0.0)
            g.setdefault("extrapolation_lr", None)
        self.mode = mode
        self.w = {p: p.detach().clone() for p in self.model.parameters()}
        self.m = {p: torch.zeros_like(p) for p in self.model.parameters()}

    def set_lr(self, lrs: list[float]) -> None:
        for g, lr in zip(self.groups, lrs):
            g["lr"] = lr

    def grads(self, batch) -> dict:
        self.model.zero_grad()
        loss_of(self.model, batch).backward()
        return {p: p.grad.detach().clone() for p in self.model.parameters()}

    def _each(self):
        for g in self.groups:
            gamma = g["lr"] if g["extrapolation_lr"] is None else g["extrapolation_lr"]
            for p in g["params"]:
                yield g, gamma, p

    @torch.no_grad()
    def _move_to(self, direction: dict) -> None:
        """u = w - gamma (d + lam w) into the model."""
        for g, gamma, p in self._each():
            p.copy_(self.w[p] - gamma * (direction[p] + g["weight_decay"] * self.w[p]))

    @torch.no_grad()
    def _update(self, grad: dict) -> None:
        for g, _, p in self._each():
            mu, w = g["momentum"], self.w[p]
            decayed = grad[p] + g["weight_decay"] * w
            self.m[p] = mu * self.m[p] + decayed
            self.w[p] = w - g["lr"] * (decayed + mu * self.m[p] if g["nesterov"] else self.m[p])
            p.copy_(self.w[p])

    def step(self, batch, second_batch=None) -> None:
        if self.mode == "local":
            self._move_to(self.grads(batch))
            self._update(self.grads(second_batch))
        else:
            grad = self.grads(batch)  # at u_t, which the model holds
            self._update(grad)
            self._move_to(grad)


def run_local(opt: ExtrapSGD, model: nn.Module, first, second) -> None:
    opt.zero_grad()
    loss_of(model, first).backward()
    opt.extrapolate()
    loss_of(model, second).backward()
    opt.step()


def run_past(opt: ExtrapSGD, model: nn.Module, batch) -> None:
    opt.zero_grad()
    loss_of(model, batch).backward()
    opt.step()


def assert_params_close(model: nn.Module, expected: list[torch.Tensor], what: str) -> None:
    for (name, p), e in zip(model.named_parameters(), expected):
        torch.testing.assert_close(
            p.detach().double().cpu(), e, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{what} {name}: {m}"
        )


@pytest.mark.parametrize("backend", backend_cases(), indirect=True)
@pytest.mark.parametrize("mode", ["local", "past"])
@pytest.mark.parametrize("bind", [True, False], ids=["bound", "copied"])
def test_matches_float64_reference(backend, mode, bind):
    """10 steps with two param groups and an LR schedule: the model, and the iterate, track float64, with
    the parameters and gradients bound to the layout or gathered and scattered."""
    model = make_model().to(backend)
    ref = Reference(model, groups(model), mode)
    # several chunks per segment, padding after each
    layout = FlatLayout(groups(model), chunk_size=32, bind=bind)
    opt = ExtrapSGD(groups(model), lr=0.2, mode=mode, layout=layout)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + 0.3 * t))
    start = [p.detach().clone() for p in model.parameters()]
    data = batches(2 * STEPS)
    for t in range(STEPS):
        ref.set_lr([g["lr"] for g in opt.param_groups])
        if mode == "local":
            run_local(opt, model, data[2 * t], data[2 * t + 1])
            ref.step(data[2 * t], data[2 * t + 1])
        else:
            run_past(opt, model, data[t])
            ref.step(data[t])
        schedule.step()
        assert_params_close(model, list(ref.model.parameters()), f"step {t}: model")
        with opt.swap_to_iterate():
            assert_params_close(model, [ref.w[p] for p in ref.model.parameters()], f"step {t}: iterate")
    moved = max((p.detach() - s).abs().max().item() for p, s in zip(model.parameters(), start))
    assert moved > 0.05, "the parameters barely moved: the comparison would be vacuous"
    buf = layout.only()
    padding = torch.ones(buf.data.numel(), dtype=torch.bool, device=buf.device)
    for lo, hi in buf.bounds:
        padding[lo:hi] = False
    assert padding.any() and (buf.data[padding] == 0).all(), "padding elements must stay zero"


def test_momentum_zero_local_is_extragradient():
    """momentum 0, no weight decay: w <- w - lr * grad f(w - gamma * grad f(w)), checked with torch.func."""
    lr, gamma = 0.3, 0.5
    model = make_model(3)
    params64 = {n: p.detach().double() for n, p in model.named_parameters()}
    model64 = copy.deepcopy(model).double()
    opt = ExtrapSGD(model.parameters(), lr=lr, momentum=0.0, extrapolation_lr=gamma)
    for batch in batches(STEPS, seed=4):

        def f(params, batch=batch):
            return loss_of_functional(model64, params, batch)

        grad_f = torch.func.grad(f)
        g_w = grad_f(params64)
        u = {n: w - gamma * g_w[n] for n, w in params64.items()}
        g_u = grad_f(u)
        params64 = {n: w - lr * g_u[n] for n, w in params64.items()}
        run_local(opt, model, batch, batch)
    assert_params_close(model, list(params64.values()), "extragradient")


def loss_of_functional(model: nn.Module, params: dict, batch) -> torch.Tensor:
    x, y = batch
    logits = torch.func.functional_call(model, params, (x.double(),))
    return nn.functional.cross_entropy(logits, y)


def test_two_buffers_closed_form():
    """A float32 and a bfloat16 parameter (two flat buffers) on f = |a|^2 + |b|^2, momentum 0:
    u = (1 - 2 gamma) w, w' = w - 2 lr u = (1 - 2 lr (1 - 2 gamma)) w."""
    a = nn.Parameter(torch.linspace(-1, 1, 37))
    b = nn.Parameter(torch.linspace(-2, 2, 21).to(torch.bfloat16))
    lr, gamma = 0.1, 0.25
    opt = ExtrapSGD([a, b], lr=lr, momentum=0.0, extrapolation_lr=gamma)
    assert len(opt.layout.buffers) == 2
    a0, b0 = a.detach().clone(), b.detach().float()
    for _ in range(3):
        opt.zero_grad()
        (a.square().sum() + b.float().square().sum()).backward()
        opt.extrapolate()
        torch.testing.assert_close(a.detach(), (1 - 2 * gamma) * opt.state[a]["iterate"])
        (a.square().sum() + b.float().square().sum()).backward()
        opt.step()
    factor = (1 - 2 * lr * (1 - 2 * gamma)) ** 3
    torch.testing.assert_close(a.detach(), factor * a0)
    torch.testing.assert_close(b.detach().float(), factor * b0, rtol=2e-2, atol=1e-2)


def test_extrapolation_lr_follows_schedule():
    """extrapolation_lr=None uses the group's lr of the moment; a set one stays fixed."""
    model = make_model()
    opt = ExtrapSGD(groups(model), lr=0.2)
    (batch,) = batches(1)
    for lr in (0.2, 0.05):
        for g, base in zip(opt.param_groups, (0.2, 0.1)):
            g["lr"] = lr * base / 0.2
        opt.zero_grad()
        loss_of(model, batch).backward()
        grads = {p: p.grad.clone() for p in model.parameters()}
        opt.extrapolate()
        for g in opt.param_groups:
            gamma = g["lr"] if g.get("extrapolation_lr") is None else g["extrapolation_lr"]
            for p in g["params"]:
                w = opt.state[p]["iterate"]
                expected = w - gamma * (grads[p] + g["weight_decay"] * w)
                torch.testing.assert_close(p.detach(), expected)
        opt.zero_grad()
        loss_of(model, batch).backward()
        opt.step()


@pytest.mark.parametrize("mode", ["local", "past"])
def test_closure_equals_explicit_calls(mode):
    data = batches(6)
    model_a, model_b = make_model(), make_model()
    opt_a = ExtrapSGD(model_a.parameters(), lr=0.1, weight_decay=1e-3, mode=mode)
    opt_b = ExtrapSGD(model_b.parameters(), lr=0.1, weight_decay=1e-3, mode=mode)
    for batch in data:
        if mode == "local":
            run_local(opt_a, model_a, batch, batch)
        else:
            run_past(opt_a, model_a, batch)

        def closure(batch=batch):
            opt_b.zero_grad()
            loss = loss_of(model_b, batch)
            loss.backward()
            return loss

        loss = opt_b.step(closure)
        assert loss is not None and loss.ndim == 0
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(pa, pb)


def checkpoint(model: nn.Module, opt: ExtrapSGD) -> bytes:
    out = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, out)
    return out.getvalue()


@pytest.mark.parametrize(("mode", "mid_step"), [("local", False), ("local", True), ("past", False)])
def test_resume_is_bit_identical(mode, mid_step):
    """Save model + optimizer after 3 steps (local mode: also between extrapolate() and step()), load into a
    fresh model and optimizer, continue: parameters, iterate and momentum equal an uninterrupted run's."""
    data = batches(12)

    def make():
        model = make_model(dtype=torch.bfloat16 if mode == "past" else torch.float32)
        return model, ExtrapSGD(groups(model), lr=0.2, mode=mode)

    def steps(model, opt, ts, resume_mid=False):
        for t in ts:
            if mode == "past":
                run_past(opt, model, data[t])
                continue
            if not resume_mid:
                opt.zero_grad()
                loss_of(model, data[2 * t % 12]).backward()
                opt.extrapolate()
            resume_mid = False
            loss_of(model, data[(2 * t + 1) % 12]).backward()
            opt.step()

    model, opt = make()
    steps(model, opt, range(6))
    expected = [p.detach().clone() for p in model.parameters()]
    expected_state = copy.deepcopy(opt.state_dict())

    model, opt = make()
    steps(model, opt, range(3))
    opt.param_groups[0]["lr"] = 0.2  # (a scheduler's change would be carried the same way)
    if mid_step:
        opt.zero_grad()
        loss_of(model, data[6]).backward()
        opt.extrapolate()
    blob = checkpoint(model, opt)
    del model, opt
    model, opt = make()
    saved = torch.load(io.BytesIO(blob))
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    steps(model, opt, range(3, 6), resume_mid=mid_step)
    for p, e in zip(model.parameters(), expected):
        assert torch.equal(p.detach(), e)
    state = opt.state_dict()
    for i, entry in expected_state["state"].items():
        for key in ("iterate", "momentum_buffer"):
            assert torch.equal(state["state"][i][key], entry[key]), f"state[{i}][{key}] differs"
    assert state["extrap"] == expected_state["extrap"]


def test_state_dict_format():
    model = make_model(dtype=torch.bfloat16)
    opt = ExtrapSGD(groups(model), lr=0.2, mode="past")
    run_past(opt, model, batches(1)[0])
    state = opt.state_dict()
    assert state["extrap"] == {"mode": "past", "extrapolated": False}
    assert [len(g["params"]) for g in state["param_groups"]] == [2, 2]
    assert state["param_groups"][1]["extrapolation_lr"] == 0.3
    for i, p in enumerate(p for g in opt.param_groups for p in g["params"]):
        entry = state["state"][i]
        assert set(entry) == {"step", "iterate", "momentum_buffer"} and entry["step"] == 1
        assert entry["iterate"].dtype == torch.bfloat16 and entry["iterate"].shape == p.shape
        assert entry["momentum_buffer"].dtype == torch.float32 and entry["momentum_buffer"].shape == p.shape
        assert entry["momentum_buffer"].abs().sum() > 0
        assert not torch.equal(entry["iterate"], p.detach()), "past mode: the model holds u, the state w"


@pytest.mark.parametrize("mode", ["local", "past"])
def test_segments_outside_the_optimizer_are_untouched(mode):
    """A shared layout holding parameters of another owner, and a frozen parameter: neither moves, not
    even inside swap_to_iterate(); a group added later starts its iterate at its values."""
    model = make_model()
    first, second = model[0], model[2]
    second.bias.requires_grad_(False)
    layout = FlatLayout(model.parameters())
    opt = ExtrapSGD([first.weight, first.bias, second.bias], lr=0.1, mode=mode, layout=layout)
    outside = [p.detach().clone() for p in (second.weight, second.bias)]
    data = batches(4)
    for t, batch in enumerate(data):
        if t == 2:
            opt.add_param_group({"params": [second.weight], "lr": 0.05})
            assert torch.equal(opt.state[second.weight]["iterate"], second.weight.detach())
            outside = outside[1:]
        if mode == "local":
            run_local(opt, model, batch, batch)
        else:
            run_past(opt, model, batch)
        with opt.swap_to_iterate():
            now = [p.detach() for p in (second.weight, second.bias)][-len(outside) :]
            assert all(torch.equal(a, b) for a, b in zip(now, outside))
        now = [p.detach() for p in (second.weight, second.bias)][-len(outside) :]
        assert all(torch.equal(a, b) for a, b in zip(now, outside))
    assert not torch.equal(first.weight.detach(), make_model()[0].weight.detach())
    assert not torch.equal(second.weight.detach(), make_model()[2].weight.detach())
    assert opt.state[second.bias]["step"] == 0 and opt.state[first.bias]["step"] == 4


def test_zero_grad_follows_torch():
    """set_to_none=True (the default) clears p.grad; False zeroes it in place, views of a layout included."""
    model = make_model()
    opt = ExtrapSGD(model.parameters(), lr=0.1)
    loss_of(model, batches(1)[0]).backward()
    grads = [p.grad for p in model.parameters()]
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is g and (g == 0).all() for p, g in zip(model.parameters(), grads))
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    layout = FlatLayout(model.parameters())
    opt = ExtrapSGD(model.parameters(), lr=0.1, layout=layout)
    loss_of(model, batches(1)[0]).backward()
    opt.zero_grad(set_to_none=False)
    layout.check_grads()
    assert (layout.only().grad == 0).all()


# ---- error paths ----


def test_local_step_without_extrapolate_raises():
    model = make_model()
    opt = ExtrapSGD(model.parameters(), lr=0.1)
    loss_of(model, batches(1)[0]).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="extrapolate"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_sequence_errors():
    model = make_model()
    opt = ExtrapSGD(model.parameters(), lr=0.1)
    loss_of(model, batches(1)[0]).backward()
    opt.extrapolate()
    with pytest.raises(RuntimeError, match="already extrapolated"):
        opt.extrapolate()
    with opt.swap_to_iterate():
        for call in (opt.step, opt.extrapolate, opt.state_dict):
            with pytest.raises(RuntimeError, match="swap_to_iterate"):
                call()
    past = ExtrapSGD(make_model().parameters(), lr=0.1, mode="past")
    with pytest.raises(RuntimeError, match="mode='local'"):
        past.extrapolate()
    with pytest.raises(RuntimeError, match="add_param_group"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(3))]})


@pytest.mark.parametrize("bound", [False, True], ids=["private", "bound"])
def test_extrapolate_clears_the_gradient(bound):
    """Local mode: the second backward must see only the gradient at u, whether p.grad is the user's tensor
    (set to None by extrapolate()) or a caller layout's view (zeroed in the fused pass)."""
    model = make_model()
    params = list(model.parameters())
    opt = ExtrapSGD(params, lr=0.1, layout=FlatLayout(params) if bound else None)
    loss_of(model, batches(1)[0]).backward()
    opt.extrapolate()
    if bound:
        opt.layout.check_grads()
        assert (opt.layout.only().grad == 0).all()
    else:
        assert all(p.grad is None for p in params)


BAD_ARGS = {
    "lr-negative": ({"lr": -0.1}, ValueError, "lr: expected a finite float >= 0, got -0.1"),
    "lr-nan": ({"lr": float("nan")}, ValueError, "lr: expected"),
    "lr-vector": ({"lr": torch.tensor([0.1, 0.2])}, ValueError, "lr: expected a 1-element tensor"),
    "momentum-one": ({"momentum": 1.0}, ValueError, r"momentum: expected a float in \[0, 1\), got 1.0"),
    "momentum-negative": ({"momentum": -0.1}, ValueError, "momentum"),
    "weight-decay": ({"weight_decay": -1e-4}, ValueError, "weight_decay"),
    "extrapolation-lr": ({"extrapolation_lr": -0.5}, ValueError, "extrapolation_lr"),
    "nesterov-str": ({"nesterov": "yes"}, TypeError, "nesterov: expected a bool"),
    "mode": ({"mode": "future"}, ValueError, "mode: expected one of"),
}


@pytest.mark.parametrize("case", list(BAD_ARGS))
def test_bad_hyper_parameters_raise(case):
    kwargs, error, message = BAD_ARGS[case]
    with pytest.raises(error, match=message):
        ExtrapSGD(make_model().parameters(), **{"lr": 0.1, **kwargs})


def test_bad_group_and_schedule_values_raise():
    model = make_model()
    spec = groups(model)
    spec[1]["momentum"] = 1.5
    with pytest.raises(ValueError, match=r"param_groups\[1\]\.momentum"):
        ExtrapSGD(spec, lr=0.1)
    opt = ExtrapSGD(groups(model), lr=0.1, mode="past")
    opt.param_groups[0]["lr"] = -1.0  # e.g. a broken scheduler
    loss_of(model, batches(1)[0]).backward()
    with pytest.raises(ValueError, match=r"param_groups\[0\]\.lr"):
        opt.step()


def test_layout_and_state_dict_mismatches_raise():
    model = make_model()
    with pytest.raises(ValueError, match="layout"):
        ExtrapSGD(model.parameters(), lr=0.1, layout=FlatLayout(list(model.parameters())[:2]))
    opt = ExtrapSGD(model.parameters(), lr=0.1, mode="local")
    past_state = ExtrapSGD(make_model().parameters(), lr=0.1, mode="past").state_dict()
    with pytest.raises(ValueError, match="mode 'local'"):
        opt.load_state_dict(past_state)
    sgd = torch.optim.SGD(make_model().parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="ExtrapSGD state"):
        opt.load_state_dict(sgd.state_dict())
    other = ExtrapSGD(nn.Sequential(nn.Linear(6, 11), nn.Tanh(), nn.Linear(11, 3)).parameters(), lr=0.1)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict(other.state_dict())
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert all(torch.equal(after["state"][i]["iterate"], s["iterate"]) for i, s in before["state"].items())
