"""Every compile-time variant of every Triton kernel, compiled for sm_90 without a GPU.

For each variant: the PTX, the widest global load and store in it, and ptxas's registers and spill bytes.
Operands are passed as the launchers pass them: ``*i64`` address tables plus ``<NAME>_DTYPE`` constexprs
(see :mod:`dynbatch_kernels.triton.launch`), so the widest access of an element-loop variant is the
operands' (the tables' and chunk bounds' loads are 64-bit).
``tests/test_triton_compile.py`` checks them; ``benchmarks/ptx_report.py`` tabulates them. Needs triton's
NVIDIA backend and a process without ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
from triton.compiler import ASTSource

from dynbatch_kernels.triton import accumulate, extrap, lamb, segments

CAPABILITY = 90
DTYPES = ("fp32", "bf16", "fp16")
TL_DTYPES = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16}
_CHUNKS = dict.fromkeys(("starts_ptr", "ends_ptr", "body_ends_ptr", "chunk_segments_ptr"), "*i64")
_ROWS = {"hyper_ptr": "*fp32", **_CHUNKS}
_ACCESS = re.compile(r"\b(ld|st)\.global(?:\.[\w:]+)*?(?:\.v(\d))?\.[bfsu](\d+)\b")
_REGISTERS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _operands(**dtypes: str) -> tuple[dict[str, str], dict[str, object]]:
    """Operands as the launchers pass them: ``<name>_table`` (an int64 address table) and
    ``<NAME>_DTYPE`` (its element type, a constexpr)."""
    types = {f"{name}_table": "*i64" for name in dtypes}
    constants = {f"{name.upper()}_DTYPE": TL_DTYPES[dtype] for name, dtype in dtypes.items()}
    return types, constants


@dataclass(frozen=True)
class Variant:
    """One specialisation: the kernel, its argument types and its constexprs."""

    name: str
    fn: triton.JITFunction
    types: dict[str, str]
    constants: dict[str, object]
    num_warps: int

    @property
    def element_loop(self) -> bool:
        """A loop over the elements of a chunk (the kernels that take ``ALIGNED``)."""
        return "ALIGNED" in self.constants

    @property
    def aligned(self) -> bool:
        return bool(self.constants.get("ALIGNED"))

    @property
    def label(self) -> str:
        flags = [k for k, v in self.constants.items() if v is True and k != "ALIGNED"]
        return " ".join([self.name, *flags, "aligned" if self.aligned else ""]).strip()


@dataclass(frozen=True)
class Compiled:
    """A compiled variant: widest global accesses in bits (0: none) and ptxas's resource use."""

    variant: Variant
    ptx: str
    load_bits: int
    store_bits: int
    registers: int
    spill_bytes: int


def _element_loops(aligned: bool) -> list[Variant]:
    tiling = {"ALIGNED": aligned, "CHUNK": 8192}
    out = []
    for dtype in DTYPES:
        for flag in (False, True):
            types, dtypes = _operands(acc="fp32", grad=dtype)
            out.append(
                Variant(
                    f"accumulate grad={dtype}",
                    accumulate._accumulate_kernel,
                    {**types, "out_table": "*i64", **_CHUNKS, "partials_ptr": "*fp32", "scale": "fp32"},
                    {**dtypes, "ZERO_GRAD": flag, **tiling, "BLOCK": accumulate.BLOCK},
                    accumulate.NUM_WARPS,
                )
            )
            types, dtypes = _operands(params=dtype, saved=dtype, direction=dtype)
            out.append(
                Variant(
                    f"extrapolate {dtype}",
                    extrap._extrapolate_kernel,
                    {**types, **_ROWS},
                    {**dtypes, "ZERO_DIRECTION": flag, **tiling, "BLOCK": extrap.BLOCK},
                    extrap.NUM_WARPS,
                )
            )
            types, dtypes = _operands(params=dtype, saved=dtype, grad=dtype, momentum="fp32")
            out.append(
                Variant(
                    f"extrap_step {dtype}",
                    extrap._extrap_step_kernel,
                    {**types, **_ROWS},
                    {**dtypes, "EXTRAPOLATE_NEXT": flag, **tiling, "BLOCK": extrap.BLOCK},
                    extrap.NUM_WARPS,
                )
            )
    return out + _lamb(tiling)


def _lamb(tiling: dict) -> list[Variant]:
    """Each LAMB kernel with every optional input absent (float32) and present (bfloat16 + master)."""
    tiling = {**tiling, "BLOCK": lamb.BLOCK}
    out = []
    for dtype, full in (("fp32", False), ("bf16", True)):

        def pick(*names: str, full: bool = full) -> tuple[dict, dict]:
            """Optional pointers given (typed) when ``full``, else absent (None constexprs)."""
            return (dict.fromkeys(names, "*fp32"), {}) if full else ({}, dict.fromkeys(names))

        flags = {"HAS_NORM": full, "HAS_FOUND_INF": full}
        w = "fp32" if full else dtype
        types, nones = pick("scale_ptr")
        tables, dtypes = _operands(x=dtype)
        out.append(
            Variant(
                f"lamb norm {dtype}",
                lamb._sq_norm_kernel,
                {**tables, **_CHUNKS, "partials_ptr": "*fp32", **types},
                {**dtypes, **nones, "HAS_SCALE": full, **tiling},
                lamb.NUM_WARPS,
            )
        )
        types, nones = pick("norm_sq_ptr", "inv_scale_ptr", "found_inf_ptr")
        tables, dtypes = _operands(w=w, grad=dtype, update=dtype, m="fp32", v="fp32")
        state = dict.fromkeys(("hyper_ptr", "step_ptr"), "*fp32")
        out.append(
            Variant(
                f"lamb update {dtype}",
                lamb._update_kernel,
                {**tables, **state, **_CHUNKS, "partials_ptr": "*fp32", **types},
                {**dtypes, **nones, **flags, "HAS_SCALE": full, **tiling},
                lamb.NUM_WARPS,
            )
        )
        types, nones = pick("norm_sq_ptr", "found_inf_ptr")
        tables, dtypes = _operands(w=w, param=dtype, update=dtype)
        out.append(
            Variant(
                f"lamb apply {dtype}",
                lamb._apply_kernel,
                {**tables, "stats_ptr": "*fp32", **_ROWS, **types},
                {**dtypes, **nones, **flags, "HAS_MASTER": full, **tiling},
                lamb.NUM_WARPS,
            )
        )
    return out


def _per_segment() -> list[Variant]:
    out = [
        Variant(
            "reduce_segments",
            segments._reduce_segments_kernel,
            {"partials_ptr": "*fp32", "segment_chunks_ptr": "*i64", "out_ptr": "*fp32"},
            {"K": 4, "ROWS": segments.ROWS},
            4,
        )
    ]
    for full in (False, True):
        types = dict.fromkeys(("norm_sq_ptr", "found_inf_ptr"), "*fp32") if full else {}
        nones = {} if full else dict.fromkeys(("norm_sq_ptr", "found_inf_ptr"))
        stats = {"stats_ptr": "*fp32", "hyper_ptr": "*fp32", "step_ptr": "*fp32", "num_segments": "i32"}
        out.append(
            Variant(
                "lamb ratio",
                lamb._ratio_kernel,
                {**stats, **types},
                {**nones, "HAS_NORM": full, "HAS_FOUND_INF": full, "SEGMENT_BLOCK": lamb.SEGMENT_BLOCK},
                lamb.NUM_WARPS,
            )
        )
    return out


def variants() -> list[Variant]:
    """Every variant the launchers can ask for, per storage dtype, unaligned and aligned."""
    return _element_loops(False) + _element_loops(True) + _per_segment()


def _widest(ptx: str, op: str) -> int:
    return max((int(v or 1) * int(bits) for o, v, bits in _ACCESS.findall(ptx) if o == op), default=0)


def _ptxas(ptx: str) -> tuple[int, int]:
    """Registers and spill bytes (stores + loads) as ptxas reports them for ``ptx``."""
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp, "kernel.ptx")
        source.write_text(ptx)
        arch = sm_arch_from_capability(CAPABILITY)
        command = [get_ptxas(CAPABILITY).path, "-v", f"--gpu-name={arch}", str(source), "-o", f"{source}.o"]
        log = subprocess.run(command, check=True, capture_output=True, text=True).stderr
    spills = _SPILLS.search(log)
    return int(_REGISTERS.search(log).group(1)), int(spills.group(1)) + int(spills.group(2))


def compile_sm90(variant: Variant) -> Compiled:
    signature = {**variant.types, **dict.fromkeys(variant.constants, "constexpr")}
    # As a launch specialises them: every argument buffer (address and chunk tables, hyper-parameters,
    # partial sums) is a fresh allocation, 16-byte aligned. The operands' own alignment is ALIGNED's.
    pointers = [(i,) for i, name in enumerate(variant.fn.arg_names) if variant.types.get(name, "")[:1] == "*"]
    attrs = {key: [["tt.divisibility", 16]] for key in pointers}
    source = ASTSource(fn=variant.fn, signature=signature, constexprs=variant.constants, attrs=attrs)
    kernel = triton.compile(
        source, target=GPUTarget("cuda", CAPABILITY, 32), options={"num_warps": variant.num_warps}
    )
    ptx = kernel.asm["ptx"]
    registers, spill_bytes = _ptxas(ptx)
    return Compiled(variant, ptx, _widest(ptx, "ld"), _widest(ptx, "st"), registers, spill_bytes)
