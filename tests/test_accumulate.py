"""ops.accumulate_ on every backend against the float64 reference."""

from __future__ import annotations

import pytest
import torch

from dynbatch_kernels import ChunkTable, FlatLayout, ops, reference
from dynbatch_kernels.available import cpp_available
from helpers import RTOL, assert_sums_close, backend_cases, poisoned_memory, random_offsets

GRAD_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def expected(acc, grad, offsets, scale):
    """float64 ground truth: the reference run on upcast copies (so float64 throughout)."""
    acc64, grad64 = acc.double(), grad.double()
    terms = torch.stack(
        [acc64 * grad64 * scale, (grad64 * scale) ** 2, acc64**2, (acc64 + grad64 * scale) ** 2], 1
    )
    sums = reference.segment_sum(terms, offsets)
    reference.accumulate_(acc64, grad64, ChunkTable.from_offsets(offsets), scale, False)
    return acc64, sums


def run_case(device, offsets, grad_dtype, scale, zero_grad, chunk_size, generator):
    n = int(offsets[-1])
    acc = torch.randn(n, generator=generator).to(device)
    grad = torch.randn(n, generator=generator).to(device=device, dtype=grad_dtype)
    ref_acc, ref_sums = expected(acc.cpu(), grad.cpu(), offsets, scale)
    table = ChunkTable.from_offsets(offsets, device=device, chunk_size=chunk_size)
    with poisoned_memory():
        sums = ops.accumulate_(acc, grad, table.offsets, scale=scale, zero_grad=zero_grad, chunks=table)
    assert_sums_close(sums.cpu(), ref_sums, RTOL[grad_dtype])
    torch.testing.assert_close(acc.cpu(), ref_acc.float(), rtol=2e-7, atol=1e-6)
    if zero_grad:
        assert (grad == 0).all()
    else:
        assert torch.isfinite(grad).all()


@pytest.mark.parametrize("backend", backend_cases(), indirect=True)
@pytest.mark.parametrize("grad_dtype", GRAD_DTYPES, ids=str)
def test_many_segments(backend, grad_dtype):
    """1,000+ segments of random sizes, including empty and length-1 ones, scale != 1."""
    gen = torch.Generator().manual_seed(hash(str(grad_dtype)) % 2**31)
    offsets = random_offsets(1031, 37, gen)
    run_case(backend, offsets, grad_dtype, scale=0.37, zero_grad=False, chunk_size=16, generator=gen)


@pytest.mark.parametrize("backend", backend_cases(), indirect=True)
@pytest.mark.parametrize("grad_dtype", GRAD_DTYPES, ids=str)
def test_aligned_table(backend, grad_dtype):
    """Segments on 16-element boundaries (empty ones too): the aligned (vectorized) kernel variant."""
    gen = torch.Generator().manual_seed(17)
    offsets = random_offsets(41, 9, gen) * 16
    assert ChunkTable.from_offsets(offsets, chunk_size=64).aligned
    run_case(backend, offsets, grad_dtype, scale=0.5, zero_grad=True, chunk_size=64, generator=gen)


@pytest.mark.parametrize("backend", backend_cases(), indirect=True)
@pytest.mark.parametrize("zero_grad", [False, True])
def test_single_odd_segment(backend, zero_grad):
    """One segment whose length is no multiple of any block, over many chunks."""
    gen = torch.Generator().manual_seed(7 + zero_grad)
    offsets = torch.tensor([0, 5003])
    run_case(backend, offsets, torch.bfloat16, scale=3.0, zero_grad=zero_grad, chunk_size=1000, generator=gen)


@pytest.mark.parametrize("backend", backend_cases(), indirect=True)
def test_default_chunking_large_segments(backend):
    """The default chunk size with segments spanning several chunks and odd tails."""
    gen = torch.Generator().manual_seed(11)
    offsets = torch.tensor([0, 1, 20000, 20000, 37777])
    run_case(backend, offsets, torch.float16, scale=1.0, zero_grad=True, chunk_size=8192, generator=gen)


@pytest.mark.parametrize("backend", backend_cases(), indirect=True)
def test_deterministic(backend):
    gen = torch.Generator().manual_seed(3)
    offsets = random_offsets(40, 300, gen)
    n = int(offsets[-1])
    acc = torch.randn(n, generator=gen).to(backend)
    grad = torch.randn(n, generator=gen).to(backend)
    table = ChunkTable.from_offsets(offsets, device=backend, chunk_size=64)
    runs = []
    for _ in range(2):
        a = acc.clone()
        runs.append((ops.accumulate_(a, grad, table.offsets, chunks=table), a))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize("backend", backend_cases(), indirect=True)
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_gradient_is_flagged_not_raised(backend, bad):
    offsets = torch.tensor([0, 100, 250, 300])
    acc = torch.randn(300).to(backend)
    grad = torch.randn(300, dtype=torch.bfloat16).to(backend)
    grad[120] = bad
    sums = ops.accumulate_(acc, grad, offsets.to(backend)).cpu()
    assert not torch.isfinite(sums[1, ops.GRAD_SQ])
    assert torch.isfinite(sums[[0, 2], ops.GRAD_SQ]).all()


@pytest.mark.parametrize("align", [16, 1])
def test_layout_model_sums_match_per_parameter_reference(align):
    """A real model through FlatLayout (aligned, and packed tightly): backward writes the flat buffer,
    sums match per parameter."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 6 * 6, 33),
        torch.nn.LayerNorm(33),
        torch.nn.Linear(33, 10),
    )
    layout = FlatLayout(model.named_parameters(), align=align)
    assert layout.chunks.aligned == (align == 16)
    buf = layout.only()
    acc = torch.zeros(buf.grad.numel())
    for lo, hi in buf.bounds:  # an earlier micro-batch's gradient; the padding stays zero
        acc[lo:hi] = torch.randn(hi - lo) * 0.1
    before = [acc[lo:hi].view_as(p).clone() for (lo, hi), p in zip(buf.bounds, buf.params)]
    model(torch.randn(5, 1, 8, 8)).square().mean().backward()
    layout.check_grads()
    assert buf.grad.abs().sum() > 0
    grads = [p.grad.clone() for p in buf.params]
    sums = ops.accumulate_(acc, buf.grad, layout.offsets, chunks=layout.chunks, zero_grad=True)
    for j, (a, g) in enumerate(zip(before, grads)):
        a, g = a.double(), g.double()
        ref = torch.stack([(a * g).sum(), (g * g).sum(), (a * a).sum(), ((a + g) ** 2).sum()])
        assert_sums_close(sums[j : j + 1], ref[None], RTOL[torch.float32])
    assert (buf.grad == 0).all() and all((p.grad == 0).all() for p in buf.params)


def test_compiles_without_graph_break():
    """One graph holding the registered op (traced through its fake), computing what eager mode does."""
    table = ChunkTable.from_offsets(torch.tensor([0, 100, 3000]))
    targets = []

    def recording_backend(gm: torch.fx.GraphModule, example_inputs):
        targets.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm

    fn = torch.compile(
        lambda a, g: ops.accumulate_(a, g, table.offsets, chunks=table).sum(0),
        fullgraph=True,
        backend=recording_backend,
    )
    acc, grad = torch.randn(3000), torch.randn(3000)
    eager = ops.accumulate_(acc.clone(), grad, table.offsets, chunks=table).sum(0)
    torch.testing.assert_close(fn(acc.clone(), grad), eager)
    assert "dynbatch.accumulate_.default" in targets, targets
    inductor = torch.compile(lambda a, g: ops.accumulate_(a, g, table.offsets, chunks=table).sum(0))
    torch.testing.assert_close(inductor(acc.clone(), grad), eager)


@pytest.mark.parametrize("backend", backend_cases(), indirect=True)
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["padded", "scattered"])
def test_out_keeps_acc_and_equals_the_in_place_pass(backend, grad_dtype, layout):
    """``out=``: the sum goes to ``out`` (NaN-poisoned before: every segment element written, padding not
    touched), bit for bit what the in-place pass leaves in ``acc``, with the same sums; ``acc`` is only
    read; ``grad`` is zeroed alike. ``out=acc`` is the in-place pass."""
    gen = torch.Generator().manual_seed(23)
    lengths = random_offsets(37, 29, gen).diff()
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), (-(-lengths // 16) * 16).cumsum(0)])
    table = ChunkTable.from_offsets(offsets, lengths=lengths.tolist(), device=backend, chunk_size=32)
    n = int(offsets[-1])
    acc = torch.randn(n, generator=gen).to(backend)
    grad = torch.randn(n, generator=gen).to(device=backend, dtype=grad_dtype)
    in_place, in_place_grad = acc.clone(), grad.clone()
    out = torch.full((n,), float("nan"), device=backend)
    if layout == "scattered":
        pieces = [out[lo : lo + k] for lo, k in zip(offsets[:-1].tolist(), lengths.tolist())]
        target: torch.Tensor | list[torch.Tensor] = pieces
    else:
        target = out
    before = acc.clone()
    expected_sums = ops.accumulate_(
        in_place, in_place_grad, table.offsets, scale=3.0, zero_grad=True, chunks=table
    )
    sums = ops.accumulate_(acc, grad, table.offsets, scale=3.0, zero_grad=True, chunks=table, out=target)
    torch.testing.assert_close(sums, expected_sums, rtol=0, atol=0)
    used = torch.zeros(n, dtype=torch.bool)
    for lo, k in zip(offsets[:-1].tolist(), lengths.tolist()):
        used[lo : lo + k] = True
    used = used.to(backend)
    assert torch.equal(acc, before) and not grad[used].any()
    assert torch.equal(out[used], in_place[used]) and out[~used].isnan().all()
    again = acc.clone()
    ops.accumulate_(again, in_place_grad.clone().fill_(1), table.offsets, chunks=table, out=again)
    torch.testing.assert_close(again[used], acc[used] + 1)
    for bad in (
        torch.zeros(n - 1, device=backend),
        [],
        grad.float() if grad_dtype == torch.float32 else out[1:],
    ):
        with pytest.raises(ValueError, match="out"):
            ops.accumulate_(acc, grad, table.offsets, chunks=table, out=bad)


def _bad_inputs():
    n = 64
    ok = dict(acc=torch.zeros(n), grad=torch.ones(n), offsets=torch.tensor([0, 10, n]))
    cases = {
        "acc-int": (dict(ok, acc=torch.zeros(n, dtype=torch.int32)), TypeError, "acc"),
        "acc-bf16": (dict(ok, acc=torch.zeros(n, dtype=torch.bfloat16)), TypeError, "acc"),
        "grad-int": (dict(ok, grad=torch.ones(n, dtype=torch.int64)), TypeError, "grad"),
        "grad-f64": (dict(ok, grad=torch.ones(n, dtype=torch.float64)), TypeError, "grad"),
        "grad-short": (dict(ok, grad=torch.ones(n - 1)), ValueError, "grad"),
        "grad-strided": (dict(ok, grad=torch.ones(2 * n)[::2]), ValueError, "contiguous"),
        "grad-2d": (dict(ok, grad=torch.ones(8, 8)), ValueError, "1-D"),
        "grad-misaligned": (dict(ok, grad=torch.ones(n + 1)[1:]), ValueError, "aligned"),
        "acc-is-grad": (dict(ok, grad=None), ValueError, "overlap"),
        "offsets-float": (dict(ok, offsets=torch.tensor([0.0, 10.0, n])), TypeError, "offsets"),
        "offsets-not-zero": (dict(ok, offsets=torch.tensor([1, 10, n])), ValueError, "offsets"),
        "offsets-decreasing": (dict(ok, offsets=torch.tensor([0, 20, 10, n])), ValueError, "offsets"),
        "offsets-short": (dict(ok, offsets=torch.tensor([0, 10, n - 1])), ValueError, "offsets"),
        "offsets-list": (dict(ok, offsets=[0, 10, n]), TypeError, "offsets"),
    }
    return cases


@pytest.mark.parametrize("case", list(_bad_inputs()))
def test_bad_input_raises_before_writing(case):
    kwargs, error, word = _bad_inputs()[case]
    if kwargs["grad"] is None:
        kwargs["grad"] = kwargs["acc"]
    acc_before = kwargs["acc"].clone()
    grad_before = kwargs["grad"].clone()
    with pytest.raises(error, match=word):
        ops.accumulate_(kwargs["acc"], kwargs["grad"], kwargs["offsets"], scale=2.0, zero_grad=True)
    assert torch.equal(kwargs["acc"], acc_before) and torch.equal(kwargs["grad"], grad_before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_devices_differ():
    acc, grad = torch.zeros(64, device="cuda"), torch.ones(64)
    with pytest.raises(ValueError, match="device"):
        ops.accumulate_(acc, grad, torch.tensor([0, 64], device="cuda"))


@pytest.mark.skipif(not cpp_available(), reason="extension not built")
def test_direct_cpp_entry_checks_its_arguments():
    """``_C.call_cpu``, the C++ kernels' entry without ``torch.ops`` (the C++ backend's every call), raises
    Python's TypeError / ValueError naming the argument, writing nothing, and runs the kernel. It borrows
    the tensors it is given: their reference counts are the same after a call, failed or not."""
    from dynbatch_kernels import _C

    table = ChunkTable.from_offsets(torch.tensor([0, 16, 48]), lengths=[5, 32])
    args = table.cpu_args
    acc, grad = torch.zeros(48), torch.ones(48)
    name = "dynbatch_cpp::accumulate_"
    with pytest.raises(TypeError, match="acc: expected a list of tensors"):
        _C.call_cpu(name, acc, [grad], None, *args, 1.0, True)
    with pytest.raises(TypeError, match=r"grad: expected a torch\.Tensor"):
        _C.call_cpu(name, [acc], [grad.tolist()], None, *args, 1.0, True)
    with pytest.raises(TypeError, match=r"chunk_ends: expected a torch\.Tensor"):
        _C.call_cpu(name, [acc], [grad], None, *args[:3], None, *args[4:], 1.0, True)
    with pytest.raises(TypeError, match="scale: expected a float, got str"):
        _C.call_cpu(name, [acc], [grad], None, *args, "2", True)
    with pytest.raises(TypeError, match="zero_grad: expected a bool"):
        _C.call_cpu(name, [acc], [grad], None, *args, 1.0, 1)
    with pytest.raises(TypeError, match="accumulate_: expected 11 arguments, got 10"):
        _C.call_cpu(name, [acc], [grad], None, *args, 1.0)
    with pytest.raises(RuntimeError, match="dynbatch_cpp::no_such_op"):
        _C.call_cpu("dynbatch_cpp::no_such_op")
    with pytest.raises(ValueError, match="grad: expected 2 tensors"):
        _C.call_cpu(name, [acc], [grad[:5]], None, *args, 1.0, True)
    pieces = [grad[:5], grad[16:]]
    counts = [t._use_count() for t in (acc, *pieces)]
    with pytest.raises(TypeError, match=r"grad: expected a torch\.Tensor, got int"):  # the third item
        _C.call_cpu(name, [acc], [*pieces, 3], None, *args, 1.0, True)
    assert not acc.any() and grad.eq(1).all()
    sums = _C.call_cpu(name, [acc], pieces, None, *args, 2.0, True)
    assert [t._use_count() for t in (acc, *pieces)] == counts
    assert acc[:5].eq(2).all() and not acc[5:16].any() and acc[16:].eq(2).all() and not grad[16:].any()
    torch.testing.assert_close(sums[:, ops.GRAD_SQ], torch.tensor([20.0, 128.0]))
