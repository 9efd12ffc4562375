"""Shared test helpers: backends and devices to run, dtype tolerances, random segment tables, poisoning."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from dynbatch_kernels import ops
from dynbatch_kernels.backends import cpp_available, triton_available

#: Relative tolerance of a float32-accumulated kernel against the float64 reference, per storage dtype.
#: The inputs are identical (low-precision values are exact in float64), so only float32 rounding differs.
RTOL = {torch.float32: 1e-4, torch.bfloat16: 1e-4, torch.float16: 1e-4, torch.float64: 1e-12}
CUDA = torch.cuda.is_available()


def backend_cases() -> list:
    """(device, backend) pairs: every backend that can run here, CUDA ones skipped without a GPU."""
    no_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    cases = [pytest.param(("cpu", "reference"), id="cpu-reference")]
    cases.append(
        pytest.param(
            ("cpu", "cpp"),
            id="cpu-cpp",
            marks=pytest.mark.skipif(not cpp_available(), reason="extension not built"),
        )
    )
    if interpreted:
        cases.append(
            pytest.param(
                ("cpu", "triton"),
                id="cpu-triton",
                marks=pytest.mark.skipif(not triton_available(), reason="triton not installed"),
            )
        )
    cases.append(pytest.param(("cuda", "triton"), id="cuda-triton", marks=no_cuda))
    cases.append(pytest.param(("cuda", "reference"), id="cuda-reference", marks=no_cuda))
    return cases


def random_offsets(
    num_segments: int, max_len: int, generator: torch.Generator, special: bool = True
) -> torch.Tensor:
    """A segment table with random lengths in [0, max_len]; with ``special``, empty and length-1 ones too."""
    lengths = torch.randint(0, max_len + 1, (num_segments,), generator=generator)
    if special and num_segments >= 4:
        lengths[0], lengths[1], lengths[-1] = 0, 1, 1
        lengths[num_segments // 2] = 0
    return torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])


@contextlib.contextmanager
def poisoned_memory() -> Iterator[None]:
    """Fill every new allocation (torch.empty and C++ at::empty alike) with NaN / max-int while active."""
    previous = torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)
        torch.utils.deterministic.fill_uninitialized_memory = fill


def assert_sums_close(out: torch.Tensor, ref: torch.Tensor, rtol: float) -> None:
    """Per-segment sums [S, 4] against the float64 reference.

    ``|g|^2`` and ``|a|^2`` are compared relative to themselves; the dot relative to its Cauchy-Schwarz
    bound ``|a| |g|`` and ``|a + g|^2`` relative to ``(|a| + |g|)^2``, so cancellation cannot hide or fake
    an error: where ``g ~ -a`` the float32 sum ``a + g`` the kernel stores is only exact to a rounding of
    ``a``'s size, which the float64 reference does not round.
    """
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert torch.isfinite(out).all(), "non-finite sum: an unwritten (poisoned) output?"
    out = out.double()
    bound = ref.abs().clone()
    norms = torch.sqrt(ref[:, ops.GRAD_SQ]), torch.sqrt(ref[:, ops.ACC_OLD_SQ])
    bound[:, ops.ACC_DOT] = norms[0] * norms[1]
    bound[:, ops.ACC_NEW_SQ] = (norms[0] + norms[1]) ** 2
    err = (out - ref).abs()
    worst = (err - rtol * bound).max()
    assert worst <= 1e-30, f"sums differ from the reference: max excess {worst.item():.3e}"


def nvidia_compiler_available() -> bool:
    if not triton_available():
        return False
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError:
        return False
    return True


def run_in_compiler_process(module: str, function: str) -> None:
    """Call ``module.function()`` in a fresh interpreter with Triton's compiler (not its interpreter)."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    command = [sys.executable, "-c", f"import {module}; {module}.{function}()"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
