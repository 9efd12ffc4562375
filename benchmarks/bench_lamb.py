"""FusedLAMB (LAMBC) optimizer steps against its eager reference, torch.compile of that reference, timm's
``Lamb`` (a real peer, with ``trust_clip=True``) and ``torch.optim.AdamW(fused=True)``: one pass of 28 bytes
per float32 element, the practical floor (LAMB's two passes move 40 bytes: a ratio of 1.43).

The optimizers step one shared set of real ``nn.Parameter``s with the layout's shapes and gradients set
(a ``FlatLayout`` binds them for FusedLAMB, the zero-copy path; the others see them as ordinary tensors),
timed round-robin. "separate grads" is FusedLAMB as a drop-in on its own copy of the parameters: its
default private layout, ``p.grad`` fresh tensors before every step (the ``zero_grad(set_to_none=True)``
loop; the untimed setup assigns them), so each step also gathers ``g`` and ``w`` and scatters ``w`` (24
bytes per float32 element more than it is credited with). The reference runs on FusedLAMB's flat buffers.
Bytes per element are each algorithm's minimum (timm and the reference move more than they are credited
with).
"""

from __future__ import annotations

import torch

from benchmarks.common import Row, Timed, side_by_side
from benchmarks.layouts import bert_base_shapes, many_small_shapes
from benchmarks.peers import timm_lamb, timm_version
from dynbatch_kernels import FlatLayout, ops, reference
from dynbatch_kernels.backends import backend_name
from dynbatch_kernels.optim import FusedLAMB

NAME = "lamb"
BASELINE = "torch AdamW(fused)"
LR = 1e-3
#: Elements above which a case counts as large: fewer repetitions (timm and the reference are slow).
LARGE = 1 << 24


def cases(quick: bool) -> list[tuple[str, list[tuple[int, ...]]]]:
    if quick:
        return [
            ("bert-2-layers", bert_base_shapes(vocab=4096, layers=2)),
            ("200-small", many_small_shapes(200)),
        ]
    return [("bert-base", bert_base_shapes()), ("2000-small", many_small_shapes())]


def run(device: torch.device, quick: bool = False) -> list[Row]:
    try:
        timm = timm_lamb()
    except ImportError as err:
        print(f"bench lamb: timm's Lamb is not benchmarked: {err}")
        timm = None
    compiled = torch.compile(reference.lamb_step_.__wrapped__)  # the flat-buffer implementation
    return [r for case, shapes in cases(quick) for r in bench_case(case, shapes, device, timm, compiled)]


def bench_case(case: str, shapes: list[tuple[int, ...]], device: torch.device, timm, compiled) -> list[Row]:
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.02).to(device)) for s in shapes]
    for p in params:
        p.grad = (torch.randn(p.shape, generator=gen) * 1e-3).to(device)
    n = sum(p.numel() for p in params)
    large = n > LARGE
    layout = FlatLayout(params)
    fused = FusedLAMB(params, lr=LR, trust_clip=(0.0, 1.0), layout=layout)
    clipped = FusedLAMB(params, lr=LR, trust_clip=(0.0, 1.0), max_grad_norm=1.0, layout=layout)
    adamw = torch.optim.AdamW(params, lr=LR, weight_decay=0.01, fused=True)
    name = f"FusedLAMB ({backend_name(device)})"
    timed = [
        (BASELINE, adamw.step, 28 * n, "1 pass"),
        (name, fused.step, 40 * n, "2 passes"),
        (name + " clip", clipped.step, 44 * n, "max_grad_norm: + a read-only norm pass"),
        separate_grads(params, name + " separate grads", 40 * n),
    ]
    if timm is not None:
        peer = timm(params, lr=LR, trust_clip=True, max_grad_norm=None)
        timed.append(("timm Lamb", peer.step, 40 * n, f"timm {timm_version()}, foreach, no grad clipping"))
    rows = side_by_side(NAME, case, timed, device, reps=5 if large else 20, warmup=2)
    timed.clear()  # free the other optimizers' state before the reference's temporaries
    del adamw, clipped
    return rows + reference_rows(case, fused, device, compiled, reps=3 if large else 10)


def separate_grads(params: list[torch.nn.Parameter], provider: str, bytes_moved: int) -> Timed:
    """FusedLAMB with its private layout over a copy of ``params``, given fresh gradients before each step."""
    own = [torch.nn.Parameter(p.detach().clone()) for p in params]
    grads = [p.grad.clone() for p in params]
    optimizer = FusedLAMB(own, lr=LR, trust_clip=(0.0, 1.0))

    def fresh_grads() -> None:
        for p, g in zip(own, grads):
            p.grad = g.clone()

    return Timed(provider, optimizer.step, bytes_moved, "p.data, p.grad read in place", fresh_grads)


def reference_rows(case: str, fused: FusedLAMB, device: torch.device, compiled, reps: int) -> list[Row]:
    """The op's reference, eager and compiled, over FusedLAMB's flat buffers."""
    (st,) = fused.flat_states
    buf = st.buffer
    hyper = torch.tensor([ops.lamb_hyper_row(lr=LR, trust_clip=(0.0, 1.0))] * buf.num_segments, device=device)
    args = (
        buf.data,
        buf.grad,
        buf.grad,
        st.tensors["exp_avg"],
        st.tensors["exp_avg_sq"],
        None,
        st.step,
        hyper,
        buf.chunks,
    )
    n = buf.data.numel()
    timed = [
        (name, lambda fn=fn: fn(*args, None, None, None), 40 * n, "")
        for name, fn in (
            ("reference eager", reference.lamb_step_.__wrapped__),
            ("reference compiled", compiled),
        )
    ]
    return side_by_side(NAME, case, timed, device, reps=reps, warmup=1)
