"""Builds dynbatch_kernels._C, the CPU kernels, from csrc/ (torch.utils.cpp_extension + ninja).

Everything else about the package is in pyproject.toml. Install with ``pip install --no-build-isolation -e .``
into an environment that already has torch.
"""

from pathlib import Path

from setuptools import setup

try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError as err:
    raise SystemExit(
        "dynbatch_kernels builds against an installed torch (>= 2.11): install torch first, then run "
        "`pip install --no-build-isolation -e .`"
    ) from err

ROOT = Path(__file__).parent
SOURCES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))

setup(
    ext_modules=[
        CppExtension(
            "dynbatch_kernels._C",
            SOURCES,
            # at::parallel_for is inlined into our code: without -fopenmp it runs on one thread.
            # -fno-math-errno: a std::sqrt that may set errno keeps a loop scalar (no kernel reads errno).
            extra_compile_args=["-O3", "-fopenmp", "-fno-math-errno", "-std=c++17"],
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
