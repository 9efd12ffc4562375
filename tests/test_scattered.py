"""Every op on operands that live anywhere: one tensor per segment (separate allocations of odd sizes and
shapes, or views at misaligned storage offsets), mixed with flat buffers whose padding no kernel may touch.
Ground truth: the reference on float64 copies of the used elements, laid out flat."""

from __future__ import annotations

import pytest
import torch

from dynbatch_kernels import ChunkTable, ops, reference
from helpers import RTOL, assert_sums_close, backend_cases, poisoned_memory

#: Segment sizes: empty, length 1, odd, a multiple of 16, and more than one chunk of 32.
SIZES = [0, 1, 37, 16, 3, 0, 64, 130, 5, 48]
KINDS = ["separate", "views"]


def layout(sizes: list[int], gap: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Offsets padded to 16 elements (plus ``gap`` more after odd segments) and the lengths."""
    room = [-(-n // 16) * 16 + (gap if n % 2 else 0) for n in sizes]
    return torch.tensor([0, *room]).cumsum(0), torch.tensor(sizes)


def scattered(values: list[torch.Tensor], kind: str, device: str) -> list[torch.Tensor]:
    """``values`` (1-D) as separate tensors: own allocations (2-D where the size allows), or views of one
    storage, each starting one element past a 16-byte boundary (misaligned)."""
    if kind == "separate":
        values = [v.to(device, copy=True) for v in values]
        return [
            v.to(device).reshape(2, -1) if v.numel() % 2 == 0 and v.numel() else v.to(device) for v in values
        ]
    dtype = values[0].dtype
    storage = torch.full(
        (sum(v.numel() + 17 for v in values) + 16,), float("nan"), dtype=dtype, device=device
    )
    views, at = [], 1
    for v in values:
        views.append(storage[at : at + v.numel()])
        views[-1].copy_(v)
        at += -(-(v.numel() + 1) // 16) * 16 + 1
    return views


def padded(values: list[torch.Tensor], offsets: torch.Tensor, device: str) -> torch.Tensor:
    """A flat buffer laid out by ``offsets``, NaN in the padding (a kernel that reads it fails)."""
    flat = torch.full((int(offsets[-1]),), float("nan"), dtype=values[0].dtype)
    for v, start in zip(values, offsets[:-1].tolist()):
        flat[start : start + v.numel()] = v
    return flat.to(device)


def used(operand, offsets: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The used elements of a flat or list operand, concatenated, as float64 on the CPU."""
    if isinstance(operand, torch.Tensor):
        parts = [operand.cpu()[s : s + n] for s, n in zip(offsets[:-1].tolist(), lengths.tolist())]
    else:
        parts = [t.cpu().reshape(-1) for t in operand]
    return torch.cat(parts).double()


def assert_padding_untouched(flat: torch.Tensor, offsets: torch.Tensor, lengths: torch.Tensor) -> None:
    mask = torch.ones(flat.numel(), dtype=torch.bool)
    for s, n in zip(offsets[:-1].tolist(), lengths.tolist()):
        mask[s : s + n] = False
    assert torch.isnan(flat.cpu()[mask].float()).all(), "a kernel wrote into the padding between segments"


def randoms(
    gen: torch.Generator, dtype: torch.dtype = torch.float32, scale: float = 1.0
) -> list[torch.Tensor]:
    return [(torch.randn(n, generator=gen) * scale).to(dtype) for n in SIZES]


def compact_table(lengths: torch.Tensor) -> ChunkTable:
    return ChunkTable.from_offsets(torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]))


@pytest.mark.parametrize("backend", backend_cases(), indirect=True)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_accumulate(backend, kind, grad_dtype):
    gen = torch.Generator().manual_seed(len(kind) + 7 * RTOL[grad_dtype].__hash__() % 97)
    offsets, lengths = layout(SIZES)
    acc_values, grad_values = randoms(gen), randoms(gen, grad_dtype)
    acc = padded(acc_values, offsets, backend)
    grad = scattered(grad_values, kind, backend)
    table = ChunkTable.from_offsets(offsets, device=backend, chunk_size=32, lengths=lengths)
    acc64, grad64 = torch.cat(acc_values).double(), torch.cat(grad_values).double()
    truth = reference.accumulate_(acc64, grad64, compact_table(lengths), 0.5, False)
    with poisoned_memory():
        sums = ops.accumulate_(acc, grad, table.offsets, scale=0.5, zero_grad=True, chunks=table)
    assert_sums_close(sums.cpu(), truth, RTOL[grad_dtype])
    torch.testing.assert_close(used(acc, offsets, lengths), acc64, rtol=2e-7, atol=1e-6)
    assert_padding_untouched(acc, offsets, lengths)
    assert all((g == 0).all() for g in grad)


@pytest.mark.parametrize("backend", backend_cases(), indirect=True)
def test_accumulate_lists_without_offsets(backend):
    """Both operands lists, no offsets: segments at the next multiple of 16; the sums match flat buffers."""
    gen = torch.Generator().manual_seed(3)
    acc_values, grad_values = randoms(gen), randoms(gen)
    acc = scattered(acc_values, "separate", backend)
    grad = scattered(grad_values, "views", backend)
    sums = ops.accumulate_(acc, grad, None, scale=2.0)
    acc64, grad64 = torch.cat(acc_values).double(), torch.cat(grad_values).double()
    truth = reference.accumulate_(acc64, grad64, compact_table(torch.tensor(SIZES)), 2.0, False)
    assert_sums_close(sums.cpu(), truth, RTOL[torch.float32])
    torch.testing.assert_close(used(acc, None, None), acc64, rtol=2e-7, atol=1e-6)


@pytest.mark.parametrize("backend", backend_cases(), indirect=True)
@pytest.mark.parametrize("kind", KINDS)
def test_segment_sq_norms(backend, kind):
    gen = torch.Generator().manual_seed(5)
    offsets, lengths = layout(SIZES)
    values = randoms(gen, torch.float16)
    x = scattered(values, kind, backend)
    table = ChunkTable.from_offsets(offsets, device=backend, chunk_size=32, lengths=lengths)
    scale = torch.tensor([0.25], device=backend)
    out = ops.segment_sq_norms(x, table.offsets, scale=scale, chunks=table)
    truth = torch.stack([(v.double() * 0.25).square().sum() for v in values])
    torch.testing.assert_close(out.cpu().double(), truth, rtol=1e-5, atol=1e-30)


@pytest.mark.parametrize("backend", backend_cases(), indirect=True)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("dtype", "own_update"), [(torch.float32, True), (torch.bfloat16, True), (torch.float32, False)]
)
def test_lamb_step(backend, kind, dtype, own_update):
    """Params and grads where the model keeps them; moments, master and the update in padded buffers."""
    gen = torch.Generator().manual_seed(11 + len(kind))
    offsets, lengths = layout(SIZES)
    segments = len(SIZES)
    w_values = randoms(gen, dtype)
    g_values = randoms(gen, dtype, scale=4.0)
    m_values, v_values = randoms(gen, scale=0.1), [v.abs() * 0.01 for v in randoms(gen)]
    master_values = [w.float() for w in w_values]
    rows = [
        ops.lamb_hyper_row(lr=0.02, weight_decay=0.01, trust_clip=(0.0, 5.0), max_grad_norm=3.0)
    ] * segments
    hyper = torch.tensor(rows, device=backend)
    step = torch.arange(segments, dtype=torch.float32, device=backend)
    inv_scale = torch.tensor([0.5], device=backend)
    param, grad = scattered(w_values, kind, backend), scattered(g_values, kind, backend)
    m, v = padded(m_values, offsets, backend), padded(v_values, offsets, backend)
    master = padded(master_values, offsets, backend) if dtype != torch.float32 else None
    update = padded([torch.zeros(n, dtype=dtype) for n in SIZES], offsets, backend) if own_update else None
    table = ChunkTable.from_offsets(offsets, device=backend, chunk_size=32, lengths=lengths)
    grad_sq = ops.lamb_grad_sq_norm(grad, table.offsets, hyper, inv_grad_scale=inv_scale, chunks=table)
    before_grad = [g.clone() for g in grad]

    flat = {k: torch.cat(vals).double() for k, vals in (("w", w_values), ("g", g_values), ("m", m_values))}
    flat["v"], flat["u"] = torch.cat(v_values).double(), torch.zeros(int(lengths.sum()), dtype=dtype)
    truth = reference.lamb_step_(
        *(flat["w"], flat["g"], flat["u"], flat["m"], flat["v"], None),
        *(step.cpu().double(), hyper.cpu(), compact_table(lengths)),
        *(grad_sq.cpu().double(), inv_scale.cpu().double(), None),
    )
    with poisoned_memory():
        stats = ops.lamb_step_(
            param,
            grad,
            m,
            v,
            table.offsets,
            hyper=hyper,
            step=step,
            master=master,
            update=update,
            grad_sq_norm=grad_sq,
            inv_grad_scale=inv_scale,
            chunks=table,
        )
    torch.testing.assert_close(stats.cpu().double(), truth, rtol=1e-4, atol=1e-30)
    torch.testing.assert_close(used(m, offsets, lengths), flat["m"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(used(v, offsets, lengths), flat["v"], rtol=1e-5, atol=1e-9)
    w = master if master is not None else param
    # u is stored in the parameters' dtype between the passes: bfloat16 rounding (the Triton interpreter
    # truncates) moves w by up to lr * r_max * |u| * 2^-7
    atol = 1e-6 if dtype == torch.float32 else 1e-6 + 0.02 * 5.0 * float(flat["u"].abs().max()) * 2**-7
    torch.testing.assert_close(used(w, offsets, lengths), flat["w"], rtol=2e-6, atol=atol)
    for buffer in (m, v, master, update):
        if buffer is not None:
            assert_padding_untouched(buffer, offsets, lengths)
    if own_update:  # grads only read
        assert all(torch.equal(a, b) for a, b in zip(grad, before_grad))
    else:  # u written into the grads, rounded to their dtype
        torch.testing.assert_close(used(grad, offsets, lengths), flat["u"].double(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", backend_cases(), indirect=True)
@pytest.mark.parametrize("kind", KINDS)
def test_extrap_ops(backend, kind):
    """``extrapolate_`` then ``extrap_step_`` with ``extrapolate_next``: params and grads as lists."""
    gen = torch.Generator().manual_seed(23)
    offsets, lengths = layout(SIZES)
    segments = len(SIZES)
    w_values, d_values, g_values = randoms(gen), randoms(gen), randoms(gen)
    m_values = randoms(gen, scale=0.1)
    row = ops.extrap_hyper_row(lr=0.1, extrapolation_lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)
    hyper = torch.tensor([row] * segments, device=backend)
    table = ChunkTable.from_offsets(offsets, device=backend, chunk_size=32, lengths=lengths)
    params = scattered(w_values, kind, backend)
    direction, grad = scattered(d_values, kind, backend), scattered(g_values, kind, backend)
    saved = padded([torch.zeros(n) for n in SIZES], offsets, backend)
    momentum = padded(m_values, offsets, backend)

    flat = {k: torch.cat(vals).double() for k, vals in (("w", w_values), ("d", d_values), ("g", g_values))}
    flat["m"], flat["s"] = torch.cat(m_values).double(), torch.zeros(int(lengths.sum()), dtype=torch.float64)
    compact = compact_table(lengths)
    reference.extrapolate_(flat["w"], flat["s"], flat["d"], hyper.cpu(), compact, True)
    reference.extrap_step_(flat["w"], flat["s"], flat["g"], flat["m"], hyper.cpu(), compact, True)
    with poisoned_memory():
        ops.extrapolate_(params, saved, direction, table.offsets, hyper, zero_direction=True, chunks=table)
        ops.extrap_step_(
            params, saved, grad, momentum, table.offsets, hyper, extrapolate_next=True, chunks=table
        )
    torch.testing.assert_close(used(params, offsets, lengths), flat["w"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(used(saved, offsets, lengths), flat["s"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(used(momentum, offsets, lengths), flat["m"], rtol=1e-5, atol=1e-6)
    assert all((d == 0).all() for d in direction)
    for buffer in (saved, momentum):
        assert_padding_untouched(buffer, offsets, lengths)


@pytest.mark.parametrize("backend", backend_cases(), indirect=True)
def test_bad_lists_are_refused(backend):
    """Each bad list raises a clear error naming the operand (and the segment) before anything is written."""
    offsets, lengths = layout(SIZES)
    table = ChunkTable.from_offsets(offsets, device=backend, chunk_size=32, lengths=lengths)
    acc = padded([torch.zeros(n) for n in SIZES], offsets, backend)
    good = [torch.ones(n, device=backend) for n in SIZES]
    cases = {
        "one tensor per segment": good[:-1],
        "segment 2: expected 37 elements": [*good[:2], torch.ones(36, device=backend), *good[3:]],
        "segment 6": [*good[:6], torch.ones(64, device=backend).half(), *good[7:]],
        "contiguous": [*good[:6], torch.ones(8, 16, device=backend).t(), *good[7:]],
    }
    for message, grad in cases.items():
        with pytest.raises((ValueError, TypeError), match=message) as err:
            ops.accumulate_(acc, grad, table.offsets, chunks=table)
        assert "grad" in str(err.value)
    assert torch.equal(
        torch.isnan(acc), torch.isnan(padded([torch.zeros(n) for n in SIZES], offsets, backend))
    )
    assert (acc.nan_to_num() == 0).all()
