"""Every Triton kernel variant compiled to sm_90 code on this GPU-less machine, and its PTX checked.

Tests elsewhere run the kernels under the interpreter, which accepts some programs the compiler rejects;
this compiles each variant (every storage dtype, every flag, unaligned and aligned chunk tables) in a
subprocess without TRITON_INTERPRET, and checks that the aligned element loops use 128-bit global loads
and stores and that ptxas spills nothing. The kernels read their operands through int64 address tables;
their 16-byte accesses rest on the alignment marks of ``chunk_pointer`` and ``load_bound``, which this
test is the only guard of.
"""

from __future__ import annotations

import pytest

from helpers import nvidia_compiler_available, run_in_compiler_process


def compile_and_check_every_variant() -> None:
    from dynbatch_kernels.triton import lamb, sm90

    problems = []
    for compiled in map(sm90.compile_sm90, sm90.variants()):
        variant = compiled.variant
        if compiled.spill_bytes:
            problems.append(f"{variant.label}: {compiled.spill_bytes} bytes spilled")
        if variant.aligned and compiled.load_bits != 128:
            problems.append(f"{variant.label}: widest global load {compiled.load_bits} bits, not 128")
        stores_elements = variant.fn is not lamb._sq_norm_kernel
        if variant.aligned and stores_elements and compiled.store_bits != 128:
            problems.append(f"{variant.label}: widest global store {compiled.store_bits} bits, not 128")
    assert not problems, "\n".join(problems)


@pytest.mark.skipif(not nvidia_compiler_available(), reason="needs triton with its NVIDIA backend")
def test_variants_cover_every_element_loop_aligned_and_not():
    from dynbatch_kernels.triton import sm90

    loops = [v for v in sm90.variants() if v.element_loop]
    assert len(loops) == 48
    assert sum(v.aligned for v in loops) == 24


@pytest.mark.skipif(not nvidia_compiler_available(), reason="needs triton with its NVIDIA backend")
def test_every_kernel_compiles_for_sm90_vectorized_without_spills():
    run_in_compiler_process("test_triton_compile", "compile_and_check_every_variant")
