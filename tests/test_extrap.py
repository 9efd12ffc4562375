"""ops.extrapolate_ and ops.extrap_step_ on every backend against the float64 reference."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dynbatch_kernels import CHUNK_SIZE, ChunkTable, ops, reference
from helpers import backend_cases, poisoned_memory, random_offsets

EPS32 = torch.finfo(torch.float32).eps
#: (parameter dtype, gradient dtype): the layout's own pairs, and a float32 gradient over bfloat16 params.
DTYPES = [
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.float32),
]
DTYPE_IDS = ["f32", "bf16", "f16", "bf16-f32grad"]


def random_hyper(num_segments: int, gen: torch.Generator) -> torch.Tensor:
    """Per-segment lr, extrapolation lr, momentum, weight decay in useful ranges; Nesterov on about half of
    the segments, about one in five inactive."""
    hyper = torch.rand(num_segments, ops.NUM_EXTRAP_HYPER, generator=gen)
    hyper[:, ops.EXTRAP_LR] *= 0.5
    hyper[:, ops.EXTRAP_GAMMA] *= 0.5
    hyper[:, ops.EXTRAP_MOMENTUM] *= 0.95
    hyper[:, ops.EXTRAP_WEIGHT_DECAY] *= 0.1
    hyper[:, ops.EXTRAP_NESTEROV] = hyper[:, ops.EXTRAP_NESTEROV].round()
    hyper[:, ops.EXTRAP_ACTIVE] = (hyper[:, ops.EXTRAP_ACTIVE] > 0.2).float()
    return hyper


def column(hyper: torch.Tensor, col: int, table: ChunkTable) -> torch.Tensor:
    return reference.per_element(hyper, col, table, torch.float64)


def assert_within(out, ref, terms, dtype, what, carried=0.0):
    """|out - ref| <= eps(dtype) * (|ref| + carried) + 4 eps32 * terms, elementwise.

    ``ref`` is the float64 result, ``terms`` the summed magnitudes of the operands (float32 arithmetic
    error), ``carried`` the magnitude of an intermediate the kernel rounds to ``dtype`` on the way.
    """
    assert torch.isfinite(out).all(), f"{what}: non-finite values (an unwritten, poisoned element?)"
    err = (out.double().cpu() - ref).abs()
    tol = torch.finfo(dtype).eps * (ref.abs() + carried) + 4 * EPS32 * terms
    excess = (err - tol).max() if err.numel() else torch.tensor(0.0)
    assert excess <= 0, (
        f"{what}: differs from the float64 reference by up to {excess.item():.3e} beyond tolerance"
    )


def make_inputs(offsets, dtype, grad_dtype, device, gen):
    n = int(offsets[-1])
    params = torch.randn(n, generator=gen).to(device=device, dtype=dtype)
    grad = torch.randn(n, generator=gen).to(device=device, dtype=grad_dtype)
    momentum = torch.randn(n, generator=gen).to(device)
    hyper = random_hyper(offsets.numel() - 1, gen).to(device)
    return params, grad, momentum, hyper


def reference64(fn, *tensors, hyper, table, flag):
    """Run the reference in float64 on CPU copies; returns the copies (updated in place)."""
    copies = [t.detach().cpu().double() for t in tensors]
    host = dataclasses.replace(
        table,
        offsets=table.offsets.cpu(),
        starts=table.starts.cpu(),
        ends=table.ends.cpu(),
        segment_chunks=table.segment_chunks.cpu(),
        chunk_segments=table.chunk_segments.cpu(),
    )
    fn(*copies, hyper.cpu(), host, flag)
    return copies


def check_extrapolate(device, offsets, dtype, grad_dtype, zero_direction, chunk_size, gen):
    params, direction, _, hyper = make_inputs(offsets, dtype, grad_dtype, device, gen)
    table = ChunkTable.from_offsets(offsets, device=device, chunk_size=chunk_size)
    active = column(hyper.cpu(), ops.EXTRAP_ACTIVE, table) != 0
    saved = torch.randn(params.numel(), generator=gen).to(params)  # inactive segments keep these
    w0, s0, d0 = (t.cpu().clone() for t in (params, saved, direction))
    ref_u, _, _ = reference64(
        reference.extrapolate_, params, saved, direction, hyper=hyper, table=table, flag=False
    )
    with poisoned_memory():
        ops.extrapolate_(
            params, saved, direction, table.offsets, hyper, zero_direction=zero_direction, chunks=table
        )
    assert torch.equal(saved.cpu(), torch.where(active, w0, s0)), "saved: expected a bit-exact copy of w"
    assert torch.equal(params.cpu()[~active], w0[~active]), "params: an inactive segment changed"
    w, d = w0.double(), d0.double()
    gamma, lam = (column(hyper.cpu(), c, table) for c in (ops.EXTRAP_GAMMA, ops.EXTRAP_WEIGHT_DECAY))
    assert_within(params, ref_u, w.abs() + gamma * (d.abs() + lam * w.abs()), dtype, "params (u)")
    zeroed = active if zero_direction else torch.zeros_like(active)
    assert torch.equal(direction.cpu(), d0.masked_fill(zeroed, 0))


def check_step(device, offsets, dtype, grad_dtype, extrapolate_next, chunk_size, gen):
    saved, grad, momentum, hyper = make_inputs(offsets, dtype, grad_dtype, device, gen)
    table = ChunkTable.from_offsets(offsets, device=device, chunk_size=chunk_size)
    active = column(hyper.cpu(), ops.EXTRAP_ACTIVE, table) != 0
    params = torch.randn(saved.numel(), generator=gen).masked_fill(active, float("nan"))
    params = params.to(saved)  # u: never read in active segments (NaN there), kept in inactive ones
    w0, m0, p0 = (t.cpu().clone() for t in (saved, momentum, params))
    g0 = grad.clone()
    ref_p, ref_s, _, ref_m = reference64(
        reference.extrap_step_, params, saved, grad, momentum, hyper=hyper, table=table, flag=extrapolate_next
    )
    with poisoned_memory():
        ops.extrap_step_(
            params,
            saved,
            grad,
            momentum,
            table.offsets,
            hyper,
            extrapolate_next=extrapolate_next,
            chunks=table,
        )
    assert torch.equal(grad, g0)
    for name, out, before in (("params", params, p0), ("saved", saved, w0), ("momentum", momentum, m0)):
        assert torch.equal(out.cpu()[~active], before[~active]), f"{name}: an inactive segment changed"
    eta, gamma, mu, lam = (
        column(hyper.cpu(), c, table)
        for c in (ops.EXTRAP_LR, ops.EXTRAP_GAMMA, ops.EXTRAP_MOMENTUM, ops.EXTRAP_WEIGHT_DECAY)
    )
    w, g, m = w0.double(), g0.double().cpu(), m0.double()
    decayed = g.abs() + lam * w.abs()
    m_terms = mu * m.abs() + decayed
    w_terms = w.abs() + eta * (decayed + mu * m_terms)
    assert_within(momentum, ref_m, m_terms, torch.float32, "momentum")
    if extrapolate_next:
        w_next = ref_s.abs()
        assert_within(saved, ref_s, w_terms, dtype, "saved (w')")
        u_terms = (1 + gamma * lam) * w_terms + gamma * g.abs()
        assert_within(params, ref_p, u_terms, dtype, "params (next u)", carried=w_next)
    else:
        assert torch.equal(saved.cpu(), w0), "saved: must not change without extrapolate_next"
        assert_within(params, ref_p, w_terms, dtype, "params (w')")


@pytest.mark.parametrize("backend", backend_cases(), indirect=True)
@pytest.mark.parametrize(("dtype", "grad_dtype"), DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("zero_direction", [False, True], ids=["keep-d", "zero-d"])
def test_extrapolate_many_segments(backend, dtype, grad_dtype, zero_direction):
    """150 segments of random sizes (empty and length-1 ones included), 16-element chunks."""
    gen = torch.Generator().manual_seed(100 + DTYPES.index((dtype, grad_dtype)) + 10 * zero_direction)
    offsets = random_offsets(150, 37, gen)
    check_extrapolate(backend, offsets, dtype, grad_dtype, zero_direction, 16, gen)


@pytest.mark.parametrize("backend", backend_cases(), indirect=True)
@pytest.mark.parametrize(("dtype", "grad_dtype"), DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("extrapolate_next", [False, True], ids=["step", "step+extrapolate"])
def test_extrap_step_many_segments(backend, dtype, grad_dtype, extrapolate_next):
    """Nesterov and heavy-ball segments mixed in one buffer, per-segment hyper-parameters."""
    gen = torch.Generator().manual_seed(200 + DTYPES.index((dtype, grad_dtype)) + 10 * extrapolate_next)
    offsets = random_offsets(150, 37, gen)
    check_step(backend, offsets, dtype, grad_dtype, extrapolate_next, 16, gen)


@pytest.mark.parametrize("backend", backend_cases(), indirect=True)
@pytest.mark.parametrize(("dtype", "grad_dtype"), DTYPES, ids=DTYPE_IDS)
def test_aligned_table(backend, dtype, grad_dtype):
    """Segments on 16-element boundaries: the aligned (vectorized) kernel variants of both passes."""
    gen = torch.Generator().manual_seed(300 + DTYPES.index((dtype, grad_dtype)))
    offsets = random_offsets(30, 6, gen) * 16
    assert ChunkTable.from_offsets(offsets, chunk_size=32).aligned
    check_extrapolate(backend, offsets, dtype, grad_dtype, True, 32, gen)
    check_step(backend, offsets, dtype, grad_dtype, True, 32, gen)


@pytest.mark.parametrize("backend", backend_cases(), indirect=True)
def test_default_chunking_odd_segments(backend):
    """The default chunk size over segments spanning several chunks with odd tails."""
    gen = torch.Generator().manual_seed(11)
    offsets = torch.tensor([0, 1, 20000, 20000, 37777])
    check_extrapolate(backend, offsets, torch.float32, torch.float32, True, CHUNK_SIZE, gen)
    check_step(backend, offsets, torch.bfloat16, torch.bfloat16, True, CHUNK_SIZE, gen)


@pytest.mark.parametrize("backend", backend_cases(), indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_past_step_is_step_then_extrapolate(backend, dtype):
    """extrap_step_(extrapolate_next=True) is extrap_step_, then extrapolate_ along the gradient, bitwise."""
    gen = torch.Generator().manual_seed(5)
    offsets = random_offsets(40, 50, gen)
    saved, grad, momentum, hyper = make_inputs(offsets, dtype, dtype, backend, gen)
    table = ChunkTable.from_offsets(offsets, device=backend, chunk_size=32)
    fused = [torch.zeros_like(saved), saved.clone(), momentum.clone()]
    ops.extrap_step_(
        fused[0], fused[1], grad, fused[2], table.offsets, hyper, extrapolate_next=True, chunks=table
    )
    split = [torch.zeros_like(saved), saved.clone(), momentum.clone()]
    ops.extrap_step_(split[0], split[1], grad, split[2], table.offsets, hyper, chunks=table)
    ops.extrapolate_(split[0], split[1], grad.clone(), table.offsets, hyper, chunks=table)
    for name, a, b in zip(("params", "saved", "momentum"), fused, split):
        assert torch.equal(a, b), f"{name}: the fused pass differs from the two passes"


@pytest.mark.parametrize("backend", backend_cases(), indirect=True)
def test_deterministic(backend):
    gen = torch.Generator().manual_seed(3)
    offsets = random_offsets(30, 200, gen)
    params, grad, momentum, hyper = make_inputs(offsets, torch.float32, torch.float32, backend, gen)
    table = ChunkTable.from_offsets(offsets, device=backend, chunk_size=64)
    runs = []
    for _ in range(2):
        p, s, m, g = params.clone(), params.clone(), momentum.clone(), grad.clone()
        ops.extrapolate_(p, s, g, table.offsets, hyper, chunks=table)
        ops.extrap_step_(p, s, g, m, table.offsets, hyper, extrapolate_next=True, chunks=table)
        runs.append((p, s, m))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("backend", backend_cases(), indirect=True)
def test_empty_buffer(backend):
    """No elements (only empty segments): nothing to do, nothing raised."""
    table = ChunkTable.from_offsets(torch.tensor([0, 0, 0]), device=backend)
    empty = torch.empty(0, device=backend)
    hyper = torch.zeros(2, ops.NUM_EXTRAP_HYPER, device=backend)
    ops.extrapolate_(empty, empty.clone(), empty.clone(), table.offsets, hyper, chunks=table)
    ops.extrap_step_(empty, empty.clone(), empty.clone(), empty.clone(), table.offsets, hyper, chunks=table)


def test_compiles_without_graph_break():
    table = ChunkTable.from_offsets(torch.tensor([0, 100, 3000]))
    hyper = random_hyper(2, torch.Generator().manual_seed(0))
    hyper[:, ops.EXTRAP_ACTIVE] = 1.0

    def both(p, s, g, m):
        ops.extrapolate_(p, s, g, table.offsets, hyper, zero_direction=True, chunks=table)
        ops.extrap_step_(p, s, g, m, table.offsets, hyper, extrapolate_next=True, chunks=table)
        return p.sum()

    inputs = [torch.randn(3000), torch.zeros(3000), torch.randn(3000), torch.randn(3000)]
    eager = [t.clone() for t in inputs]
    both(*eager)
    compiled = [t.clone() for t in inputs]
    torch.compile(both, fullgraph=True)(*compiled)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _bad_inputs():
    n = 64
    ok = dict(
        params=torch.zeros(n),
        saved=torch.zeros(n),
        grad=torch.ones(n),
        momentum=torch.zeros(n),
        offsets=torch.tensor([0, 10, n]),
        hyper=torch.full((2, ops.NUM_EXTRAP_HYPER), 0.1),
    )
    other_table = ChunkTable.from_offsets(torch.tensor([0, 10, n]))  # built for another offsets tensor
    return {
        "params-int": (dict(ok, params=torch.zeros(n, dtype=torch.int32)), TypeError, "params"),
        "params-f64": (dict(ok, params=torch.zeros(n, dtype=torch.float64)), TypeError, "params"),
        "saved-other-dtype": (dict(ok, saved=torch.zeros(n, dtype=torch.bfloat16)), TypeError, "saved"),
        "saved-short": (dict(ok, saved=torch.zeros(n - 1)), ValueError, "saved"),
        "saved-is-params": (dict(ok, saved="params"), ValueError, "overlap"),
        "grad-f64": (dict(ok, grad=torch.ones(n, dtype=torch.float64)), TypeError, "grad|direction"),
        "grad-strided": (dict(ok, grad=torch.ones(2 * n)[::2]), ValueError, "contiguous"),
        "grad-misaligned": (dict(ok, grad=torch.ones(n + 1)[1:]), ValueError, "aligned"),
        "grad-is-saved": (dict(ok, grad="saved"), ValueError, "overlap"),
        "momentum-bf16": (dict(ok, momentum=torch.zeros(n, dtype=torch.bfloat16)), TypeError, "momentum"),
        "momentum-is-grad": (dict(ok, momentum="grad"), ValueError, "overlap"),
        "hyper-f64": (
            dict(ok, hyper=torch.zeros(2, ops.NUM_EXTRAP_HYPER, dtype=torch.float64)),
            TypeError,
            "hyper",
        ),
        "hyper-rows": (dict(ok, hyper=torch.zeros(3, ops.NUM_EXTRAP_HYPER)), ValueError, "hyper"),
        "hyper-list": (dict(ok, hyper=[[0.1] * ops.NUM_EXTRAP_HYPER] * 2), TypeError, "hyper"),
        "offsets-decreasing": (dict(ok, offsets=torch.tensor([0, 20, 10, n])), ValueError, "offsets"),
        "offsets-short": (dict(ok, offsets=torch.tensor([0, 10, n - 1])), ValueError, "offsets"),
        "offsets-list": (dict(ok, offsets=[0, 10, n]), TypeError, "offsets"),
        "chunks-for-other-offsets": (dict(ok, chunks=other_table), ValueError, "chunks"),
    }


@pytest.mark.parametrize(
    ("op", "case"),
    [
        (op, case)
        for op in ("extrapolate_", "extrap_step_")
        for case in _bad_inputs()
        if op == "extrap_step_" or not case.startswith("momentum")  # extrapolate_ has no momentum
    ],
)
def test_bad_input_raises_before_writing(op, case):
    kwargs, error, word = _bad_inputs()[case]
    for name, value in list(kwargs.items()):
        if isinstance(value, str):
            kwargs[name] = kwargs[value]
    buffers = [kwargs[k] for k in ("params", "saved", "grad", "momentum")]
    before = [b.clone() for b in buffers]
    extra = {"chunks": kwargs["chunks"]} if "chunks" in kwargs else {}
    with pytest.raises(error, match=word):
        if op == "extrapolate_":
            ops.extrapolate_(
                kwargs["params"], kwargs["saved"], kwargs["grad"], kwargs["offsets"], kwargs["hyper"],
                zero_direction=True, **extra,
            )  # fmt: skip
        else:
            ops.extrap_step_(*buffers, kwargs["offsets"], kwargs["hyper"], extrapolate_next=True, **extra)
    assert all(torch.equal(b, a) for b, a in zip(buffers, before))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_devices_differ():
    params, saved = torch.zeros(64, device="cuda"), torch.zeros(64)
    hyper = torch.zeros(1, ops.NUM_EXTRAP_HYPER, device="cuda")
    with pytest.raises(ValueError, match="device"):
        ops.extrapolate_(
            params, saved, torch.zeros(64, device="cuda"), torch.tensor([0, 64], device="cuda"), hyper
        )
