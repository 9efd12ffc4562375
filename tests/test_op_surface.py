"""The op surface as PyTorch sees it: opcheck, fake tensors, the eager fast path, cached chunk tables and
the device each Triton launch runs on."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from dynbatch_kernels import ChunkTable, checks, ops
from helpers import backend_cases

N = 96
OFFSETS = [0, 32, 32, 80, N]


def op_cases(device: str = "cpu") -> dict[str, tuple]:
    """Each custom op with arguments as its public function passes them (a small aligned table): operands
    as one-element lists (flat buffers), and the gradients of ``accumulate_`` and ``lamb_step_`` as one
    tensor per segment."""
    gen = torch.Generator().manual_seed(0)
    table = ChunkTable.from_offsets(torch.tensor(OFFSETS), device=device, chunk_size=32)
    segments = table.num_segments

    def flat(dtype=torch.float32):
        return [torch.randn(N, generator=gen).to(device=device, dtype=dtype)]

    def per_segment(dtype=torch.float32):
        lengths = torch.tensor(OFFSETS).diff().tolist()
        return [torch.randn(n, generator=gen).to(device=device, dtype=dtype) for n in lengths]

    def scalar(value):
        return torch.tensor([value], device=device)

    extrap = torch.tensor([ops.extrap_hyper_row(lr=0.1, extrapolation_lr=0.05, momentum=0.9)] * segments)
    lamb = torch.tensor([ops.lamb_hyper_row(lr=0.01, max_grad_norm=1.0)] * segments)
    extrap, lamb = extrap.to(device), lamb.to(device)
    steps = torch.zeros(segments, device=device)
    args = table.op_args()
    m, v = flat(), [flat()[0].abs()]
    return {
        "accumulate_": (flat(), per_segment(torch.bfloat16), flat(), *args, 0.5, True),  # out= given
        "extrapolate_": (flat(), flat(), flat(), extrap, *args, True),
        "extrap_step_": (flat(), flat(), flat(), flat(), extrap, *args, True),
        "segment_sq_norms": (flat(torch.float16), *args, scalar(0.25)),
        "lamb_step_": (
            *(
                flat(torch.bfloat16),
                per_segment(torch.bfloat16),
                flat(torch.bfloat16),
                m,
                v,
                flat(),
                steps,
                lamb,
            ),
            *(*args, scalar(4.0), scalar(0.5), scalar(0.0)),
        ),
        "lamb_update_": (
            *(flat(torch.bfloat16), per_segment(torch.bfloat16), flat(torch.bfloat16), m, v, flat()),
            *(steps, lamb, *args, scalar(4.0), scalar(0.5), scalar(0.0)),
        ),
        "lamb_apply_": (
            *(flat(torch.bfloat16), per_segment(torch.bfloat16), flat(), steps, lamb),
            *(
                torch.rand(segments, ops.NUM_LAMB_STATS, generator=gen).to(device),
                *args,
                scalar(4.0),
                scalar(0.0),
            ),
        ),
    }


@pytest.mark.parametrize("backend", backend_cases(), indirect=True)
@pytest.mark.parametrize("name", list(op_cases()))
def test_opcheck(backend, name):
    torch.library.opcheck(getattr(torch.ops.dynbatch, name).default, op_cases(backend)[name])


def fake_calls(mode: FakeTensorMode) -> dict[str, object]:
    """Every public op called under ``mode`` on fake copies of real inputs (built outside the mode)."""
    real = op_cases()

    def to_fake(arg):
        if isinstance(arg, list):
            return [to_fake(a) for a in arg]
        return mode.from_tensor(arg) if isinstance(arg, torch.Tensor) else arg

    fake = {name: [to_fake(a) for a in args] for name, args in real.items()}
    table = ChunkTable.from_op_args(*real["accumulate_"][3:5])
    chunks = ChunkTable.from_op_args(*fake["accumulate_"][3:5])
    offsets = chunks.offsets
    with mode:
        (acc,), grad = fake["accumulate_"][:2]
        (params,), (saved,), (direction,), hyper = fake["extrapolate_"][:4]
        (momentum,), extrap_hyper = fake["extrap_step_"][3:5]
        (x,), scale = fake["segment_sq_norms"][0], fake["segment_sq_norms"][-1]
        (param,), lamb_grad, (update,), (m,), (v,), (master,), step, lamb_hyper = fake["lamb_step_"][:8]
        return {
            "table": table,
            "accumulate_": ops.accumulate_(acc, grad, offsets, scale=2.0, chunks=chunks),
            "extrapolate_": ops.extrapolate_(params, saved, direction, offsets, hyper, chunks=chunks),
            "extrap_step_": ops.extrap_step_(
                params, saved, direction, momentum, offsets, extrap_hyper, chunks=chunks
            ),
            "segment_sq_norms": ops.segment_sq_norms(x, offsets, scale=scale, chunks=chunks),
            "lamb_step_": ops.lamb_step_(
                *(param, lamb_grad, m, v, offsets),
                **dict(hyper=lamb_hyper, step=step, master=master, update=update, chunks=chunks),
            ),
        }


def test_public_ops_trace_under_fake_tensor_mode():
    """No false overlap or alignment errors from fake pointers; outputs are fake with the right shapes."""
    out = fake_calls(FakeTensorMode())
    segments = out["table"].num_segments
    assert isinstance(out["accumulate_"], FakeTensor) and out["accumulate_"].shape == (segments, 4)
    assert out["segment_sq_norms"].shape == (segments,)
    assert out["lamb_step_"].shape == (segments, ops.NUM_LAMB_STATS)
    assert out["extrapolate_"] is None and out["extrap_step_"] is None


def test_real_overlap_is_still_caught_in_eager_mode():
    buf = torch.zeros(2 * N)
    with pytest.raises(ValueError, match="overlap"):
        ops.accumulate_(buf[:N], buf[16 : N + 16], torch.tensor(OFFSETS))


def test_eager_only_without_modes_or_subclasses():
    plain = torch.zeros(4)
    assert checks.eager(plain, torch.nn.Parameter(torch.zeros(2)), 1.0, None)
    with FakeTensorMode() as mode:
        assert not checks.eager(plain)
        fake = mode.from_tensor(plain)
    assert not checks.eager(fake)
    assert checks.eager([plain, plain], []) and not checks.eager([fake], plain)  # lists of segments


def table_for(offsets: torch.Tensor, acc: torch.Tensor) -> ChunkTable:
    """The table a plain call (no ``chunks=``) over the flat buffer ``acc`` gets."""
    return checks.table_for(offsets, [("acc", acc, [acc])], None)


def test_plain_calls_reuse_the_chunk_table():
    offsets = torch.tensor(OFFSETS)
    acc, grad = torch.zeros(N), torch.ones(N)
    first = table_for(offsets, acc)
    assert table_for(offsets, acc) is first
    ops.accumulate_(acc, grad, offsets)
    assert table_for(offsets, acc) is first


def test_a_changed_offsets_tensor_gets_a_new_table():
    offsets = torch.tensor(OFFSETS)
    acc, grad = torch.zeros(N), torch.ones(N)
    first = table_for(offsets, acc)
    offsets[1] = 16  # in place: bumps offsets._version
    second = table_for(offsets, acc)
    assert second is not first and second.offsets.tolist() == [0, 16, 32, 80, N]
    assert ops.accumulate_(acc, grad, offsets)[:2, 1].tolist() == [16.0, 16.0]
    offsets.view(-1)[1] = 8  # through a view: the version counter is shared
    assert table_for(offsets, acc).offsets.tolist() == [0, 8, 32, 80, N]


def test_a_new_offsets_tensor_is_never_served_an_old_table():
    acc = torch.zeros(N)
    seen = []
    for first in range(0, 64, 8):  # freed and reallocated: the same address and version may come back
        offsets = torch.tensor([0, first, N])
        table = table_for(offsets, acc)
        assert table.offsets.tolist() == [0, first, N]
        seen.append(table)
        del offsets
    assert len({id(t) for t in seen}) == len(seen)


def test_bad_offsets_are_rejected_on_every_call():
    offsets = torch.tensor([0, 50, 40, N])
    for _ in range(2):
        with pytest.raises(ValueError, match="non-decreasing"):
            ops.accumulate_(torch.zeros(N), torch.ones(N), offsets)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs (a non-default device)")
def test_triton_launches_on_the_tensors_device(monkeypatch):
    """Buffers on cuda:1 while cuda:0 is current: every op runs there and matches the CPU reference."""
    monkeypatch.setenv("DYNBATCH_BACKEND", "triton")
    on_gpu = op_cases("cuda:1")
    monkeypatch.setenv("DYNBATCH_BACKEND", "reference")
    on_cpu = op_cases("cpu")
    torch.cuda.set_device(0)
    for name in on_gpu:
        monkeypatch.setenv("DYNBATCH_BACKEND", "triton")
        out = getattr(torch.ops.dynbatch, name)(*on_gpu[name])
        torch.cuda.synchronize(1)
        monkeypatch.setenv("DYNBATCH_BACKEND", "reference")
        expected = getattr(torch.ops.dynbatch, name)(*on_cpu[name])
        if out is not None:
            torch.testing.assert_close(out.cpu(), expected, rtol=1e-3, atol=1e-5)
        flatten = lambda args: [t for a in args for t in (a if isinstance(a, list) else [a])]
        for got, want in zip(flatten(on_gpu[name]), flatten(on_cpu[name])):
            if isinstance(got, torch.Tensor) and got.is_floating_point():
                torch.testing.assert_close(got.cpu(), want, rtol=1e-2, atol=1e-3)
        assert torch.cuda.current_device() == 0
