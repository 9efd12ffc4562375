"""The optimizers and the accumulator read parameters and gradients where they live: their private flat
copies of parameters are never read, the user's gradients are never written by an optimizer, and the
copying path (non-contiguous parameters) gives the same result."""

from __future__ import annotations

import pytest
import torch
from test_dropin import MAKERS, batches, every_optimizer, mlp, params_of, train

from dynbatch_kernels import FlatLayout
from dynbatch_kernels.batching import FixedPolicy, GradientAccumulator
from dynbatch_kernels.optim import FusedLAMB


def poison_private_copies(opt) -> None:
    """NaN into the optimizer's flat parameter and gradient copies: a step that reads them fails."""
    for st in opt.flat_states:
        st.buffer.data.fill_(float("nan"))
        st.buffer.grad.fill_(float("nan"))


@every_optimizer
def test_steps_never_read_the_private_copies(make):
    """The same run with the private copies poisoned after construction equals a bound-layout run, and the
    flat parameter copy is never written (nothing gathered into it)."""
    model, twin = mlp(0), mlp(0)
    opt = make(model.parameters())
    bound = make(list(twin.parameters()), layout=FlatLayout(list(twin.parameters())))
    poison_private_copies(opt)
    data = batches(4)
    train(model, opt, data)
    train(twin, bound, data)
    assert all(torch.isnan(st.buffer.data).all() for st in opt.flat_states)  # no gather, no scatter
    for p, q in zip(params_of(model), params_of(twin)):
        assert torch.isfinite(p).all()
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_fused_lamb_never_writes_the_users_gradients():
    model = mlp(0)
    opt = FusedLAMB(model.parameters(), lr=0.02, max_grad_norm=1.0)
    torch.nn.functional.mse_loss(model(torch.randn(5, 8)), torch.zeros(5, 4)).backward()
    before = [p.grad.clone() for p in model.parameters()]
    ptrs = [(p.data_ptr(), p.grad.data_ptr()) for p in model.parameters()]
    opt.step()
    for p, g, (w_ptr, g_ptr) in zip(model.parameters(), before, ptrs):
        assert torch.equal(p.grad, g)
        assert (p.data_ptr(), p.grad.data_ptr()) == (w_ptr, g_ptr)


@pytest.mark.parametrize("name", list(MAKERS))
def test_non_contiguous_parameters_take_the_copying_path(name):
    """A transposed weight (non-contiguous) trains exactly like its contiguous twin."""
    model, twin = mlp(0), mlp(0)
    with torch.no_grad():
        weight = model[0].weight
        weight.data = weight.data.t().contiguous().t()
    assert not model[0].weight.is_contiguous()
    opt, ref = MAKERS[name](model.parameters()), MAKERS[name](twin.parameters())
    data = batches(4)
    train(model, opt, data)
    train(twin, ref, data)
    assert not opt.flat_states[0].in_place and ref.flat_states[0].in_place
    for p, q in zip(params_of(model), params_of(twin)):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_accumulator_reads_replaced_gradients_in_place():
    """``zero_grad(set_to_none=True)`` before every backward: the gradients the backward allocates are read
    where they are (zeroed by the fused pass) and ``p.grad`` is pointed back at the buffer's view; the step
    equals the one on the concatenated batch."""
    model, twin = mlp(0), mlp(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref = torch.optim.SGD(twin.parameters(), lr=0.1)
    acc = GradientAccumulator(opt, FixedPolicy(12), model=model)
    data = batches(2)
    for x, y in data:
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        allocated = [p.grad for p in model.parameters()]
        ready = acc.accumulate(num_samples=len(x))
        assert all((g == 0).all() for g in allocated)  # read and zeroed in place
        assert all(p.grad is not g for p, g in zip(model.parameters(), allocated))
    assert ready
    acc.step()
    x = torch.cat([b[0] for b in data])
    y = torch.cat([b[1] for b in data])
    torch.nn.functional.cross_entropy(twin(x), y).backward()
    ref.step()
    for p, q in zip(params_of(model), params_of(twin)):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_a_view_written_then_replaced_is_not_read_later():
    """A backward writes into the accumulator's view, the gradient is then cleared (as ExtrapSGD's
    ``extrapolate()`` does) and the next backward allocates a new one: that one is read in place, and the
    view's stale values must not leak into a later sum (the buffers swap at the step)."""
    model, twin = mlp(0), mlp(0)
    acc = GradientAccumulator(torch.optim.SGD(model.parameters(), lr=0.1), FixedPolicy(12), model=model)
    ref = torch.optim.SGD(twin.parameters(), lr=0.1)
    loss = torch.nn.functional.cross_entropy
    (x1, y1), (x2, y2), (x3, y3), (x4, y4), (x5, y5) = batches(5)
    loss(model(x1), y1).backward()
    assert acc.accumulate(num_samples=6) is False
    loss(model(x2), y2).backward()  # into the accumulator's views
    model.zero_grad(set_to_none=True)  # discarded
    loss(model(x3), y3).backward()  # a fresh tensor per parameter
    assert acc.accumulate(num_samples=6)
    acc.step()
    for x, y in ((x4, y4), (x5, y5)):
        loss(model(x), y).backward()
        ready = acc.accumulate(num_samples=6)
    assert ready
    acc.step()
    for pair in (((x1, y1), (x3, y3)), ((x4, y4), (x5, y5))):
        ref.zero_grad()
        loss(twin(torch.cat([b[0] for b in pair])), torch.cat([b[1] for b in pair])).backward()
        ref.step()
    for p, q in zip(params_of(model), params_of(twin)):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
