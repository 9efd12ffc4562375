"""ops.lamb_step_ (and its two halves, lamb_update_ and lamb_apply_), ops.segment_sq_norms and
ops.lamb_grad_sq_norm on every backend against float64."""

from __future__ import annotations

import pytest
import torch
from lamb_cases import bf16_rtol, random_options

from dynbatch_kernels import CHUNK_SIZE, ChunkTable, ops, reference
from dynbatch_kernels.available import cpp_available
from helpers import (
    RTOL,
    backend_cases,
    poisoned_memory,
    random_offsets,
)

#: Relative error of the update u as held in grad's dtype between the passes (float32: float32 arithmetic).
U_RTOL = {torch.float32: 2e-5, torch.float16: 2**-10}
#: (param dtype, master copy) cases of the op.
STORAGE = [(torch.float32, False), (torch.bfloat16, True), (torch.float16, True), (torch.bfloat16, False)]


def hyper_table(num_segments: int, gen: torch.Generator, inactive: tuple[int, ...] = ()) -> torch.Tensor:
    """Per-segment rows with random options (every segment its own group), some segments inactive."""
    rows = [ops.lamb_hyper_row(**random_options(gen), active=j not in inactive) for j in range(num_segments)]
    return torch.tensor(rows, dtype=torch.float32)


def make_case(device, offsets, dtype, master, gen, inactive=(3,)):
    """Random buffers: w, g scaled by 8, m, v >= 0, per-segment step counts, the hyper table."""
    n, num_segments = int(offsets[-1]), offsets.numel() - 1
    w = torch.randn(n, generator=gen).to(dtype)
    case = {
        "param": w,
        "grad": (torch.randn(n, generator=gen) * 8).to(dtype),
        "exp_avg": torch.randn(n, generator=gen) * 0.1,
        "exp_avg_sq": torch.rand(n, generator=gen) * 0.01,
        "master": w.float() + torch.randn(n, generator=gen) * 1e-4 if master else None,
        "step": torch.randint(0, 20, (num_segments,), generator=gen).float(),
        "hyper": hyper_table(num_segments, gen, inactive),
        "inv_grad_scale": torch.tensor(0.125),
    }
    return {k: None if v is None else v.to(device) for k, v in case.items()}


def float64_truth(case, offsets, grad_sq_norm, found_inf=None):
    """The reference run on float64 copies: the ground truth (u is not rounded to grad's dtype there)."""
    c = {k: v.detach().cpu().double().clone() for k, v in case.items() if v is not None}
    stats = reference.lamb_step_(
        c["param"],
        c["grad"],
        c["grad"],  # u into grad's buffer, as the op does without update=
        c["exp_avg"],
        c["exp_avg_sq"],
        c.get("master"),
        c["step"],
        c["hyper"],
        ChunkTable.from_offsets(offsets),
        grad_sq_norm.cpu().double(),
        c["inv_grad_scale"],
        found_inf,
    )
    return c, stats


def run_op(case, table, **extra):
    return ops.lamb_step_(
        case["param"],
        case["grad"],
        case["exp_avg"],
        case["exp_avg_sq"],
        table.offsets,
        hyper=case["hyper"],
        step=case["step"],
        master=case["master"],
        inv_grad_scale=case["inv_grad_scale"],
        chunks=table,
        **extra,
    )


def run_and_check(device, offsets, dtype, master, chunk_size, generator, inactive=(3,)):
    """One op call (norm from pass 0) on random buffers, checked against the float64 ground truth.

    Pass 1 is compared with the truth directly; pass 2 given pass 1 (``w - lr*r*u`` with the ``u`` the
    kernel stored, which is rounded to grad's dtype); inactive segments must be untouched.
    """
    table = ChunkTable.from_offsets(offsets, device=device, chunk_size=chunk_size)
    case = make_case(device, offsets, dtype, master, generator, inactive)
    before = {k: v.clone() for k, v in case.items() if v is not None}
    with poisoned_memory():
        norm_sq = ops.lamb_grad_sq_norm(
            case["grad"], table.offsets, case["hyper"], inv_grad_scale=case["inv_grad_scale"], chunks=table
        )
        stats = run_op(case, table, grad_sq_norm=norm_sq)
    truth, truth_stats = float64_truth(before, offsets, norm_sq)
    active = (case["hyper"][:, ops.LAMB_ACTIVE] != 0).cpu()
    g64 = before["grad"].cpu().double() * 0.125
    expected_norm_sq = reference.segment_sum(g64 * g64, offsets)[active].sum()
    torch.testing.assert_close(norm_sq.cpu().double(), expected_norm_sq, rtol=RTOL[dtype], atol=0)

    stats = stats.cpu().double()
    assert torch.isfinite(stats).all()
    torch.testing.assert_close(stats, truth_stats, rtol=1e-4, atol=1e-30)
    assert torch.equal(case["step"].cpu(), truth["step"].float())
    torch.testing.assert_close(case["exp_avg"].cpu().double(), truth["exp_avg"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(case["exp_avg_sq"].cpu().double(), truth["exp_avg_sq"], rtol=1e-5, atol=1e-9)
    u = case["grad"].cpu().double()
    u_rtol = bf16_rtol(device) if dtype == torch.bfloat16 else U_RTOL[dtype]
    torch.testing.assert_close(u, truth["grad"], rtol=u_rtol, atol=u_rtol * 1e-3)
    lengths = offsets.diff()
    inactive = torch.repeat_interleave(~active, lengths)
    lr_ratio = case["hyper"][:, ops.LAMB_LR].cpu().double() * truth_stats[:, ops.LAMB_RATIO]
    scale = torch.repeat_interleave(torch.where(active, lr_ratio, 0.0), lengths)
    w_before = (before["master"] if master else before["param"]).cpu().double()
    w_expected = w_before - scale * torch.where(inactive, 0.0, u)
    w_after = case["master"] if master else case["param"]
    w_rtol = 2e-7 if master or dtype == torch.float32 else bf16_rtol(device)
    torch.testing.assert_close(w_after.cpu().double(), w_expected, rtol=w_rtol, atol=1e-7)
    if master:  # the parameters are the rounded master copy
        param, rounded = case["param"].cpu()[~inactive], case["master"].cpu()[~inactive].to(dtype)
        if dtype == torch.bfloat16 and bf16_rtol(device) > 2**-8:
            torch.testing.assert_close(param, rounded, rtol=2**-7, atol=0)
        else:
            assert torch.equal(param, rounded)
    for key, value in case.items():
        if key not in ("step", "hyper", "inv_grad_scale") and value is not None:
            unchanged = torch.equal(value.cpu()[inactive], before[key].cpu()[inactive])
            assert unchanged, f"{key} of an inactive segment was written"


@pytest.mark.parametrize("backend", backend_cases(), indirect=True)
@pytest.mark.parametrize(("dtype", "master"), STORAGE, ids=["f32", "bf16-master", "f16-master", "bf16"])
def test_matches_float64_reference(backend, dtype, master):
    """Many segments (empty, length 1, odd), every segment its own options, clipping by a global norm."""
    gen = torch.Generator().manual_seed(11 + STORAGE.index((dtype, master)))
    run_and_check(backend, random_offsets(29, 70, gen), dtype, master, chunk_size=32, generator=gen)


@pytest.mark.parametrize("backend", backend_cases(), indirect=True)
@pytest.mark.parametrize(("dtype", "master"), STORAGE, ids=["f32", "bf16-master", "f16-master", "bf16"])
def test_aligned_table(backend, dtype, master):
    """Segments on 16-element boundaries: the aligned (vectorized) variants of every pass."""
    gen = torch.Generator().manual_seed(21 + STORAGE.index((dtype, master)))
    offsets = random_offsets(17, 5, gen) * 16
    assert ChunkTable.from_offsets(offsets, chunk_size=32).aligned
    run_and_check(backend, offsets, dtype, master, chunk_size=32, generator=gen)


@pytest.mark.parametrize("backend", backend_cases(), indirect=True)
@pytest.mark.parametrize("cause", ["found_inf", "nan_norm", "inf_norm"])
def test_skipped_step_writes_nothing(backend, cause):
    """found_inf or a non-finite global norm: every buffer stays bit-identical; found_inf reports it."""
    gen = torch.Generator().manual_seed(5)
    offsets = random_offsets(9, 50, gen)
    table = ChunkTable.from_offsets(offsets, device=backend, chunk_size=32)
    case = make_case(backend, offsets, torch.bfloat16, True, gen)
    before = {k: v.clone() for k, v in case.items() if v is not None}
    found_inf = torch.tensor([1.0 if cause == "found_inf" else 0.0], device=backend)
    norm_sq = torch.tensor({"found_inf": 4.0, "nan_norm": float("nan"), "inf_norm": float("inf")}[cause])
    stats = run_op(case, table, grad_sq_norm=norm_sq.to(backend), found_inf=found_inf)
    for key, value in case.items():
        if value is not None:
            assert torch.equal(value, before[key]), f"{key} was written by a skipped step"
    assert found_inf.item() == 1.0
    assert torch.isfinite(stats[:, ops.LAMB_W_SQ]).all()


@pytest.mark.parametrize("backend", backend_cases(), indirect=True)
def test_deterministic(backend):
    gen = torch.Generator().manual_seed(3)
    offsets = random_offsets(12, 200, gen)
    table = ChunkTable.from_offsets(offsets, device=backend, chunk_size=64)
    case = make_case(backend, offsets, torch.float32, False, gen)
    runs = []
    for _ in range(2):
        copy = {k: None if v is None else v.clone() for k, v in case.items()}
        stats = run_op(copy, table, grad_sq_norm=torch.tensor(9.0, device=backend))
        runs.append([stats, *(v for v in copy.values() if v is not None)])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("backend", backend_cases(), indirect=True)
def test_default_chunking_long_segments(backend):
    """The default chunk size with segments spanning several chunks and odd tails, float16 with master."""
    gen = torch.Generator().manual_seed(2)
    offsets = torch.tensor([0, 1, 20000, 20000, 37777])
    run_and_check(backend, offsets, torch.float16, True, chunk_size=CHUNK_SIZE, generator=gen, inactive=())


@pytest.mark.parametrize("backend", backend_cases(), indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_segment_sq_norms(backend, dtype):
    gen = torch.Generator().manual_seed(4)
    offsets = random_offsets(40, 90, gen)
    table = ChunkTable.from_offsets(offsets, device=backend, chunk_size=32)
    x = (torch.randn(int(offsets[-1]), generator=gen) * 300).to(dtype)
    scale = torch.tensor(0.25)
    with poisoned_memory():
        out = ops.segment_sq_norms(x.to(backend), table.offsets, scale=scale.to(backend), chunks=table)
    expected = reference.segment_sum((x.double() * 0.25) ** 2, offsets)
    assert out.dtype == torch.float32 and out.shape == (40,)
    torch.testing.assert_close(out.cpu().double(), expected, rtol=RTOL[dtype], atol=0)


@pytest.mark.parametrize("backend", backend_cases(), indirect=True)
@pytest.mark.parametrize(("dtype", "master"), STORAGE, ids=["f32", "bf16-master", "f16-master", "bf16"])
@pytest.mark.parametrize("skip", [None, "found_inf", "nan_norm"])
def test_update_then_apply_is_the_step_bit_for_bit(backend, dtype, master, skip):
    """lamb_update_ and lamb_apply_ (the sharded optimizers' two calls) give lamb_step_'s every output."""
    gen = torch.Generator().manual_seed(11)
    offsets = random_offsets(13, 60, gen)
    table = ChunkTable.from_offsets(offsets, device=backend, chunk_size=32)
    whole = make_case(backend, offsets, dtype, master, gen)
    split = {k: None if v is None else v.clone() for k, v in whole.items()}
    norm = torch.tensor([float("nan") if skip == "nan_norm" else 4.0], device=backend)
    scalars = lambda: {
        "grad_sq_norm": norm,
        "found_inf": torch.tensor([float(skip == "found_inf")], device=backend),
    }
    whole_scalars, split_scalars = scalars(), scalars()
    expected = run_op(whole, table, **whole_scalars)
    stats = ops.lamb_update_(
        *(split[k] for k in ("param", "grad", "exp_avg", "exp_avg_sq")),
        table.offsets,
        **{k: split[k] for k in ("hyper", "step", "master", "inv_grad_scale")},
        chunks=table,
        **split_scalars,
    )
    assert not stats[:, ops.LAMB_RATIO].any()
    ops.lamb_apply_(
        split["param"],
        split["grad"],
        table.offsets,
        **{k: split[k] for k in ("hyper", "step", "master")},
        stats=stats,
        chunks=table,
        **split_scalars,
    )
    torch.testing.assert_close(stats, expected, rtol=0, atol=0, equal_nan=True)  # NaN: the skipped norm
    for key, value in whole.items():
        assert value is None or torch.equal(split[key], value), key
    assert torch.equal(split_scalars["found_inf"], whole_scalars["found_inf"])


@pytest.mark.skipif(not cpp_available(), reason="extension not built")
@pytest.mark.parametrize(("dtype", "master"), STORAGE[:2], ids=["f32", "bf16-master"])
@pytest.mark.parametrize("misaligned", [False, True], ids=["aligned", "misaligned-update"])
def test_streamed_update_is_the_in_place_update_bit_for_bit(dtype, master, misaligned):
    """``lamb_update_`` (pass 1 alone) writes a separate ``update`` of 8 MiB or more with streaming stores
    (the C++ kernels): the same bits as ``u`` written over the gradient, in every element of ``update``
    (NaN-poisoned before) and in every other output. ``lamb_step_`` on the same buffers keeps each wave's
    ``u`` in scratch, and of the larger segment's the end of each thread's part, streaming the rest to
    ``update``: the in-place step's bits either way. ``misaligned``: ``update`` is one tensor per segment,
    each 2 elements past a 16-byte boundary (a flat buffer must be aligned)."""
    gen = torch.Generator().manual_seed(5)
    sizes = [1, 0, 4_300_001 if dtype == torch.bfloat16 else 2_200_003, 77, 5000]
    offsets = torch.tensor([0, *(-(-n // 16) * 16 for n in sizes)]).cumsum(0)
    table = ChunkTable.from_offsets(offsets, lengths=sizes)
    in_place = make_case("cpu", offsets, dtype, master, gen, inactive=(3,))
    streamed = {k: None if v is None else v.clone() for k, v in in_place.items()}
    stepped = {k: None if v is None else v.clone() for k, v in in_place.items()}
    room = torch.full((int(offsets[-1]) + 2,), float("nan"), dtype=dtype)
    starts = offsets[:-1].tolist()
    flat = room[:-2]
    assert flat.numel() * flat.element_size() >= 8 << 20
    pieces = [room[2 + lo : 2 + lo + n] for lo, n in zip(starts, sizes)]
    pass1 = ("param", "grad", "exp_avg", "exp_avg_sq")
    update_args = {"chunks": table, **{k: in_place[k] for k in ("hyper", "step", "master", "inv_grad_scale")}}
    stats = ops.lamb_update_(
        *(streamed[k] for k in pass1), table.offsets, update=pieces if misaligned else flat, **update_args
    )
    expected = ops.lamb_update_(*(in_place[k] for k in pass1), table.offsets, **update_args)
    torch.testing.assert_close(stats, expected, rtol=0, atol=0)
    for key, value in in_place.items():
        if key != "grad":
            assert value is None or torch.equal(streamed[key], value), key
    for j, (lo, n) in enumerate(zip(starts, sizes)):
        if in_place["hyper"][j, ops.LAMB_ACTIVE] != 0:
            written = pieces[j] if misaligned else flat[lo : lo + n]
            assert torch.equal(written, in_place["grad"][lo : lo + n]), j

    threads = torch.get_num_threads()
    for parts in (1, 3):  # threads: each keeps the end of its part of the large segment
        torch.set_num_threads(parts)
        try:
            room.fill_(float("nan"))
            step = {k: None if v is None else v.clone() for k, v in stepped.items()}
            whole = {k: None if v is None else v.clone() for k, v in stepped.items()}
            stats = run_op(step, table, update=pieces if misaligned else flat)
            expected = run_op(whole, table)
        finally:
            torch.set_num_threads(threads)
        torch.testing.assert_close(stats, expected, rtol=0, atol=0)
        for key, value in whole.items():
            if key != "grad":
                assert value is None or torch.equal(step[key], value), key
        lo, n = starts[2], sizes[2]  # the one segment larger than a wave
        written = pieces[2] if misaligned else flat[lo : lo + n]
        expected_u = whole["grad"][lo : lo + n]
        streamed_out = ~written.isnan()
        assert torch.equal(written[streamed_out], expected_u[streamed_out])
        assert room.isnan().sum() == room.numel() - int(streamed_out.sum())  # nothing else written
        # Streamed, kept, streamed, kept...: one run of each per part, the first chunk streamed out.
        runs = torch.unique_consecutive(streamed_out)
        assert runs.tolist() == [True, False] * parts, parts


@pytest.mark.skipif(not cpp_available(), reason="extension not built")
def test_step_in_waves_with_an_empty_segment_of_a_wave_of_room():
    """An empty segment whose room alone exceeds a wave (2**20 elements) is a wave without chunks: the
    C++ ``lamb_step_`` with a separate ``update`` gives the in-place step's bits."""
    gen = torch.Generator().manual_seed(9)
    offsets = torch.tensor([0, 1_100_000, 1_100_016])
    table = ChunkTable.from_offsets(offsets, lengths=[0, 5])
    case = make_case("cpu", offsets, torch.float32, False, gen, inactive=())
    whole = {k: None if v is None else v.clone() for k, v in case.items()}
    stats = run_op(case, table, update=torch.full_like(case["grad"], float("nan")))
    torch.testing.assert_close(stats, run_op(whole, table), rtol=0, atol=0)
    assert torch.equal(case["param"], whole["param"]) and torch.equal(case["step"], whole["step"])


@pytest.mark.skipif(not cpp_available(), reason="extension not built")
@pytest.mark.parametrize(("dtype", "master"), STORAGE[:2], ids=["f32", "bf16-master"])
@pytest.mark.parametrize("over_grad", [False, True], ids=["separate-update", "update-is-grad-views"])
def test_step_in_waves_is_the_two_pass_step_bit_for_bit(dtype, master, over_grad):
    """The C++ ``lamb_step_`` runs both passes wave by wave (segments of up to 2**20 elements together,
    ``u`` of those kept in scratch; a larger segment alone, its ``u`` partly in scratch, partly streamed to
    ``update``, unless it goes over the gradient): every output is that of ``lamb_update_`` then
    ``lamb_apply_``, which run each pass over all segments, with ``u`` in ``update``. ``over_grad``:
    ``grad`` is the per-segment views of the flat ``update`` (FusedLAMB's call on bound gradients), so
    every segment's gradient ends holding ``u``, as in the two passes."""
    gen = torch.Generator().manual_seed(8)
    sizes = [300_001, 5, 0, 700_000, 1, 1_100_000, 400_000, 77, 250_000, 3]
    offsets = torch.tensor([0, *(-(-n // 16) * 16 for n in sizes)]).cumsum(0)
    table = ChunkTable.from_offsets(offsets, lengths=sizes)
    waves = make_case("cpu", offsets, dtype, master, gen, inactive=(4, 7))
    split = {k: None if v is None else v.clone() for k, v in waves.items()}
    scalars = {"grad_sq_norm": torch.tensor([4e6])}
    room = lambda: torch.full((int(offsets[-1]),), float("nan"), dtype=dtype)
    grad, update = waves["grad"], room()
    if over_grad:  # the same memory: grad as segment views of the flat update
        update = waves["grad"]
        grad = [update[lo : lo + n] for lo, n in zip(offsets[:-1].tolist(), sizes)]
    with poisoned_memory():
        stats = run_op({**waves, "grad": grad}, table, update=update, **scalars)
    split_update = split["grad"] if over_grad else room()  # u over the gradient, or a separate buffer
    expected = ops.lamb_update_(
        *(split[k] for k in ("param", "grad", "exp_avg", "exp_avg_sq")),
        table.offsets,
        **{k: split[k] for k in ("hyper", "step", "master", "inv_grad_scale")},
        update=None if over_grad else split_update,
        chunks=table,
        **scalars,
    )
    ops.lamb_apply_(
        split["param"],
        split_update,
        table.offsets,
        **{k: split[k] for k in ("hyper", "step", "master")},
        stats=expected,
        chunks=table,
        **scalars,
    )
    assert expected[:, ops.LAMB_RATIO].ne(1).sum() >= 6  # trust ratios at work
    torch.testing.assert_close(stats, expected, rtol=0, atol=0)
    for key, value in waves.items():
        assert value is None or torch.equal(split[key], value), key


def test_apply_checks_the_stats_table():
    param, update = torch.zeros(20), torch.zeros(20)
    args = dict(hyper=torch.tensor([ops.lamb_hyper_row(lr=0.1)] * 2), step=torch.zeros(2))
    offsets = torch.tensor([0, 4, 20])
    for stats, error in (
        (torch.zeros(2, 3), ValueError),
        (torch.zeros(2, 4, dtype=torch.float64), TypeError),
    ):
        with pytest.raises(error, match="stats"):
            ops.lamb_apply_(param, update, offsets, stats=stats, **args)
    assert not param.any()


def test_compiles_without_graph_break():
    table = ChunkTable.from_offsets(torch.tensor([0, 100, 3000]))
    gen = torch.Generator().manual_seed(0)
    case = make_case("cpu", table.offsets, torch.float32, False, gen, inactive=())
    eager = {k: None if v is None else v.clone() for k, v in case.items()}

    def fn(c):
        norm_sq = ops.lamb_grad_sq_norm(c["grad"], table.offsets, c["hyper"], chunks=table)
        return run_op(c, table, grad_sq_norm=norm_sq).sum(0)

    torch.testing.assert_close(torch.compile(fn, fullgraph=True)(case), fn(eager))
    for key, value in case.items():
        assert value is None or torch.equal(value, eager[key]), key


def _bad_inputs():
    n, s = 64, 2
    ok = {
        "param": torch.zeros(n),
        "grad": torch.ones(n),
        "exp_avg": torch.zeros(n),
        "exp_avg_sq": torch.zeros(n),
        "offsets": torch.tensor([0, 10, n]),
        "hyper": torch.tensor([ops.lamb_hyper_row(lr=0.1)] * s),
        "step": torch.zeros(s),
    }
    return {
        "param-f64": ({"param": torch.zeros(n, dtype=torch.float64)}, TypeError, "param"),
        "grad-other-dtype": ({"grad": torch.ones(n, dtype=torch.bfloat16)}, TypeError, "grad"),
        "exp_avg-bf16": ({"exp_avg": torch.zeros(n, dtype=torch.bfloat16)}, TypeError, "exp_avg"),
        "exp_avg_sq-short": ({"exp_avg_sq": torch.zeros(n - 1)}, ValueError, "exp_avg_sq"),
        "grad-is-param": ({"grad": None}, ValueError, "overlap"),
        "master-for-f32": ({"master": torch.zeros(n)}, ValueError, "master"),
        "hyper-columns": ({"hyper": torch.zeros(s, ops.NUM_LAMB_HYPER - 1)}, ValueError, "hyper"),
        "hyper-f64": ({"hyper": torch.zeros(s, ops.NUM_LAMB_HYPER, dtype=torch.float64)}, TypeError, "hyper"),
        "step-length": ({"step": torch.zeros(s + 1)}, ValueError, "step"),
        "step-int": ({"step": torch.zeros(s, dtype=torch.int64)}, TypeError, "step"),
        "found_inf-bool": ({"found_inf": torch.zeros(1, dtype=torch.bool)}, TypeError, "found_inf"),
        "norm-two-elements": ({"grad_sq_norm": torch.zeros(2)}, TypeError, "grad_sq_norm"),
        "offsets-decreasing": ({"offsets": torch.tensor([0, 20, 10, n])}, ValueError, "offsets"),
        "offsets-list": ({"offsets": [0, 10, n]}, TypeError, "offsets"),
    }, ok


@pytest.mark.parametrize("case", list(_bad_inputs()[0]))
def test_bad_input_raises_before_writing(case):
    cases, ok = _bad_inputs()
    changes, error, word = cases[case]
    kwargs = {**ok, **changes}
    if kwargs["grad"] is None:
        kwargs["grad"] = kwargs["param"]
    before = {k: v.clone() for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    positional = [kwargs.pop(k) for k in ("param", "grad", "exp_avg", "exp_avg_sq", "offsets")]
    with pytest.raises(error, match=word):
        ops.lamb_step_(*positional, **kwargs)
    after = dict(zip(("param", "grad", "exp_avg", "exp_avg_sq", "offsets"), positional), **kwargs)
    for key, value in before.items():
        assert torch.equal(after[key], value), f"{key} written before the error"
