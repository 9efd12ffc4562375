"""FlatLayout: flat buffers per (device, dtype), views, the segment table, refusals."""

from __future__ import annotations

import pytest
import torch

from dynbatch_kernels import FlatLayout


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3, bias=False))


def test_views_names_and_offsets():
    model = small_model()
    values = [p.detach().clone() for p in model.parameters()]
    layout = FlatLayout(model.named_parameters(), align=4)
    buf = layout.only()
    assert layout.names == ["0.weight", "0.bias", "2.weight"]
    assert layout.offsets.tolist() == [0, 36, 44, 68]  # lengths 35, 7, 21 rounded up to multiples of 4
    for p, v, (lo, _) in zip(model.parameters(), values, buf.bounds):
        assert torch.equal(p, v), "values survive the move into the flat buffer"
        assert p.data_ptr() == buf.data[lo:].data_ptr() and p.grad.data_ptr() == buf.grad[lo:].data_ptr()
        assert p.is_contiguous() and p.grad.shape == p.shape
    pad = torch.ones(buf.data.numel(), dtype=torch.bool)
    for lo, hi in buf.bounds:
        pad[lo:hi] = False
    assert pad.sum() == 1 + 1 + 3 and (buf.data[pad] == 0).all()


def test_backward_writes_the_flat_buffer_and_optimizers_see_the_views():
    model = small_model()
    layout = FlatLayout(model.named_parameters())
    model(torch.randn(4, 5)).sum().backward()
    layout.check_grads()
    expected = torch.cat([p.grad.flatten() for p in model.parameters()])
    packed = torch.cat([layout.only().grad[lo:hi] for lo, hi in layout.only().bounds])
    assert torch.equal(packed, expected) and expected.abs().sum() > 0
    before = layout.only().data.clone()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert not torch.equal(layout.only().data, before), "p.data updates land in the flat buffer"


def test_set_to_none_is_diagnosed_and_gathered():
    """After model.zero_grad() the backward allocates fresh gradients: check_grads says so (the fast path is
    off), gather_grads copies them in, bind_grads points them back at the flat buffer."""
    model = small_model()
    layout = FlatLayout(model.named_parameters())
    model.zero_grad(set_to_none=True)
    model(torch.randn(2, 5)).sum().backward()
    with pytest.raises(RuntimeError, match=r"0\.weight.*flat-buffer view, got a separate tensor"):
        layout.check_grads()
    buf = layout.only()
    expected = [p.grad.clone() for p in model.parameters()]
    assert buf.gather_grads().missing == []
    buf.bind_grads()
    layout.check_grads()
    assert all(torch.equal(p.grad, e) for p, e in zip(model.parameters(), expected))


def test_private_layout_gathers_and_scatters_without_rebinding():
    model = small_model()
    params = list(model.parameters())
    pointers = [p.data_ptr() for p in params]
    buf = FlatLayout(model.named_parameters(), bind=False).only()
    assert [p.data_ptr() for p in params] == pointers and all(p.grad is None for p in params)
    assert not any(buf.data_is_view(j) or buf.grad_is_view(j) for j in range(3))
    buf.grad.fill_(7.0)
    params[1].grad = torch.full((7,), 2.0)
    found = buf.gather_grads()
    assert (found.missing, found.frozen) == ([0, 2], []) and found.tensors[1] is params[1].grad
    assert torch.equal(buf.grad_view(1), params[1].grad) and (buf.grad_view(0) == 0).all()
    with torch.no_grad():
        params[0].mul_(3.0)
    buf.gather_data()
    assert all(torch.equal(buf.data_view(j), p) for j, p in enumerate(params))
    buf.data.add_(1.0)
    buf.scatter_data()
    assert all(torch.equal(buf.data_view(j), p) for j, p in enumerate(params))
    assert [p.data_ptr() for p in params] == pointers


def test_gather_compares_with_the_current_grad_buffer():
    """An owner may swap ``buf.grad`` for another tensor and point ``p.grad`` into it (the accumulator's
    A/G swap): those are views again, nothing is copied."""
    model = small_model()
    buf = FlatLayout(model.named_parameters()).only()
    swapped = torch.randn_like(buf.grad)
    buf.grad = swapped
    assert not buf.grad_is_view(0)
    buf.bind_grads()
    assert all(buf.grad_is_view(j) for j in range(3))
    before = swapped.clone()
    assert buf.gather_grads().missing == []
    assert torch.equal(swapped, before)
    assert model[0].weight.grad.data_ptr() == swapped.data_ptr()


def test_stale_parameters():
    model = small_model()
    layout = FlatLayout(model.named_parameters(), bind=False)
    assert layout.stale() is None
    model[2].weight.data = torch.randn(3, 7)  # same shape, dtype, device: still fits
    assert layout.stale() is None
    model[0].bias.data = torch.randn(8)
    assert layout.stale() == "0.bias"
    assert [layout.only().is_stale(j) for j in range(3)] == [False, True, False]
    model[0].bias.grad = torch.zeros(8)
    with pytest.raises(ValueError, match=r"0\.bias: expected \.grad of shape \(7,\), got \(8,\)"):
        layout.only().gather_grads()
    model.half()
    assert layout.stale() == "0.weight"


def test_dtype_groups_and_param_groups():
    a = torch.nn.Parameter(torch.randn(3, 3))
    b = torch.nn.Parameter(torch.randn(5, dtype=torch.bfloat16))
    c = torch.nn.Parameter(torch.randn(2))
    layout = FlatLayout([{"params": [a, b]}, {"params": [c], "lr": 0.1}], align=1)
    assert [(buf.dtype, buf.num_segments) for buf in layout.buffers] == [
        (torch.float32, 2),
        (torch.bfloat16, 1),
    ]
    assert layout.locate(c) == (0, 1) and layout.locate(b) == (1, 0)
    assert layout.buffers[0].names == ["group0.param0", "group1.param0"]
    with pytest.raises(ValueError, match=r"one \(device, dtype\) buffer"):
        _ = layout.offsets


def test_existing_grads_are_kept_and_empty_params_allowed():
    p = torch.nn.Parameter(torch.randn(4))
    p.grad = torch.full((4,), 2.0)
    empty = torch.nn.Parameter(torch.empty(0))
    layout = FlatLayout([p, empty])
    assert torch.equal(p.grad, torch.full((4,), 2.0))
    assert layout.offsets.tolist() == [0, 16, 16]


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: [torch.arange(3)], TypeError, "floating-point"),
        (lambda: [torch.randn(3, dtype=torch.complex64)], TypeError, "complex parameters are not supported"),
        (lambda: [torch.randn(3, requires_grad=True) * 2], ValueError, "leaf"),
        (lambda: [torch.randn(4, 4).to_sparse().requires_grad_()], TypeError, "dense"),
        (lambda: [], ValueError, "at least one"),
        (lambda: [{"lr": 1.0}], ValueError, "no 'params'"),
        (lambda: ["weight"], TypeError, "expected a tensor"),
    ],
)
def test_refusals(make, error, match):
    with pytest.raises(error, match=match):
        FlatLayout(make())


def test_shared_storage_and_duplicates_are_refused():
    base = torch.randn(10)
    first, second = torch.nn.Parameter(base[:6]), torch.nn.Parameter(base[4:])
    with pytest.raises(ValueError, match="shares storage"):
        FlatLayout([first, second])
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="listed twice"):
        FlatLayout([p, p])
