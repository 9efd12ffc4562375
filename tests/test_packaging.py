"""Packaging: the metadata and its pins, the package on torch alone, and an import graph without cycles."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import dynbatch_kernels
from dynbatch_kernels.extras import EXTRA_MODULES

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]


# --- metadata and pins ---------------------------------------------------------------------------------


def pins(name: str) -> dict[str, str]:
    """``name==version`` lines of a requirements-style file, by canonical name."""
    found = {}
    for line in (ROOT / name).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            requirement = Requirement(line)
            found[canonicalize_name(requirement.name)] = str(requirement.specifier).removeprefix("==")
    return found


def test_metadata_lives_in_pyproject_with_the_version_in_one_place():
    assert PROJECT["name"] == "dynbatch_kernels" and PROJECT["dynamic"] == ["version"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "dynbatch_kernels.__version__"}
    assert importlib.metadata.version("dynbatch_kernels") == dynbatch_kernels.__version__
    assert PROJECT["dependencies"] == ["torch>=2.11"]
    assert set(PROJECT["optional-dependencies"]) == {"triton", "demo", "dev"}
    setup_calls = [
        node
        for node in ast.walk(ast.parse((ROOT / "setup.py").read_text()))
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup"
    ]
    assert [sorted(k.arg for k in call.keywords) for call in setup_calls] == [["cmdclass", "ext_modules"]]


def test_every_declared_range_has_one_pin_that_satisfies_it():
    pinned = pins("requirements.txt")
    constrained = pins("constraints.txt")
    assert not pinned.keys() & constrained.keys(), "a package pinned in both files"
    extras = PROJECT["optional-dependencies"]
    declared = [Requirement(r) for r in PROJECT["dependencies"] + [r for rs in extras.values() for r in rs]]
    for req in declared:
        version = {**pinned, **constrained}.get(canonicalize_name(req.name))
        assert version is not None, f"{req.name} has no pin"
        assert req.specifier.contains(version, prereleases=True), f"{req.name}=={version} outside {req}"
    in_extras = {canonicalize_name(req.name) for req in declared}
    assert set(pinned) <= in_extras, f"pinned but in no extra: {set(pinned) - in_extras}"


def test_extra_modules_come_from_the_declared_extras():
    distributions = importlib.metadata.packages_distributions()
    for extra, modules in EXTRA_MODULES.items():
        declared = {canonicalize_name(Requirement(r).name) for r in PROJECT["optional-dependencies"][extra]}
        provided = {canonicalize_name(d) for module in modules for d in distributions[module]}
        assert provided == declared, extra


def test_makefile_installs_torch_first_then_everything_under_the_constraints():
    recipe = re.search(r"^\$\(VENV\)/\.installed:.*?\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), re.M)
    installs = [line for line in recipe.group(1).splitlines() if "pip install" in line]
    assert installs[0].split()[-3:] == ["-c", "constraints.txt", "torch"]
    assert all("-c constraints.txt" in line for line in installs)
    assert all("-r requirements.txt" in line or "--no-deps" in line for line in installs[1:])


# --- the package with torch alone ------------------------------------------------------------------------

#: Hides the optional packages (and numpy) from every import finder, as in an environment with torch alone:
#: ``import numpy`` raises ModuleNotFoundError and ``importlib.util.find_spec("numpy")`` is None.
BLOCK_OPTIONAL = """
import importlib.util, sys

BLOCKED = {"numpy", "triton", "tqdm", "matplotlib", "sklearn"}


class Hiding:
    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            return None
        return self.finder.find_spec(name, path, target)

    def __getattr__(self, attr):
        return getattr(self.finder, attr)


sys.meta_path[:] = [Hiding(finder) for finder in sys.meta_path]
assert importlib.util.find_spec("numpy") is None
"""


def run_with_torch_alone(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("DYNBATCH_BACKEND", "TRITON_INTERPRET")}
    script = BLOCK_OPTIONAL + textwrap.dedent(code)
    return subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def test_ops_optimizers_and_policies_work_with_torch_alone():
    result = run_with_torch_alone(
        """
        import os

        import torch

        import dynbatch_kernels, dynbatch_kernels.batching, dynbatch_kernels.optim
        from dynbatch_kernels import AnglePolicy, FixedPolicy, GradientAccumulator, ops
        from dynbatch_kernels.optim import ExtrapSGD, FusedLAMB

        for backend in ("auto", "reference"):
            os.environ["DYNBATCH_BACKEND"] = backend
            acc = torch.zeros(64)
            sums = ops.accumulate_(acc, torch.ones(64), torch.tensor([0, 16, 64]))
            assert sums[:, ops.GRAD_SQ].tolist() == [16.0, 48.0], sums
            for make_optimizer, policy in (
                (lambda p: FusedLAMB(p, lr=0.1), AnglePolicy(min_samples=4, max_samples=8)),
                (lambda p: ExtrapSGD(p, lr=0.1, mode="past"), FixedPolicy(8)),
            ):
                torch.manual_seed(0)
                model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
                before = [p.detach().clone() for p in model.parameters()]
                accumulator = GradientAccumulator(make_optimizer(model.parameters()), policy, model=model)
                steps = 0
                for _ in range(4):
                    x, y = torch.randn(4, 4), torch.randint(0, 2, (4,))
                    loss = torch.nn.functional.cross_entropy(model(x), y)
                    loss.backward()
                    if accumulator.accumulate(len(y), loss.detach()):
                        accumulator.step()
                        steps += 1
                accumulator.close()
                assert steps >= 2, steps
                assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
        loaded = {name.partition(".")[0] for name in sys.modules} & BLOCKED
        assert not loaded, loaded
        print("ok")
        """
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_the_main_job_names_the_extra_to_install():
    result = run_with_torch_alone(
        """
        import runpy

        sys.argv = ["dynbatch_kernels", "train", "--epochs", "0.1"]
        runpy.run_module("dynbatch_kernels", run_name="__main__", alter_sys=True)
        """
    )
    assert result.returncode == 1, result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert "tqdm, matplotlib, sklearn" in message and "pip install 'dynbatch_kernels[demo]'" in message


def test_the_main_job_help_works_with_torch_alone():
    result = run_with_torch_alone(
        """
        import runpy

        sys.argv = ["dynbatch_kernels", "train", "--help"]
        runpy.run_module("dynbatch_kernels", run_name="__main__", alter_sys=True)
        """
    )
    assert result.returncode == 0 and "--optimizer" in result.stdout, result.stderr
    assert "AdamW" not in result.stdout  # lamb no longer falls back to it


def test_the_demo_data_and_plot_name_the_extra():
    result = run_with_torch_alone(
        """
        from dynbatch_kernels.data import load_digits_split
        from dynbatch_kernels.train import plot_runs

        for call in (load_digits_split, lambda: plot_runs([], None)):
            try:
                call()
            except ImportError as err:
                print(err)
        """
    )
    lines = result.stdout.splitlines()
    assert result.returncode == 0 and len(lines) == 2, result.stderr
    assert all("pip install 'dynbatch_kernels[demo]'" in line for line in lines), lines


# --- the import graph -----------------------------------------------------------------------------------


def package_modules(root: Path, package: str) -> dict[str, Path]:
    """Every module of the package under ``root``, by dotted name (a package by its ``__init__``)."""
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Which package modules each module imports, anywhere in its code (function bodies included).

    Counted as imports: ``import``/``from ... import`` statements (relative ones resolved), and strings
    naming a package module (``importlib.import_module("...")``). Importing ``a.b.c`` imports ``a`` and
    ``a.b`` too, except the importer's own parent packages, which are always imported before it.
    """
    modules = package_modules(root, package)
    graph = {}
    for name, path in modules.items():
        own_package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = []
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = own_package.split(".")[: len(own_package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets += [base] + [f"{base}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Constant) and node.value in modules:
                targets.append(node.value)
        parents = {".".join(name.split(".")[:k]) for k in range(1, name.count(".") + 1)}
        graph[name] = {
            prefix
            for target in targets
            for k in range(1, target.count(".") + 2)
            if (prefix := ".".join(target.split(".")[:k])) in modules and prefix not in parents | {name}
        }
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that ends where it starts, or None."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return [*path[path.index(node) :], node]
        if node in done:
            return None
        for nxt in sorted(graph[node]):
            if cycle := visit(nxt, [*path, node]):
                return cycle
        done.add(node)
        return None

    for start in sorted(graph):
        if cycle := visit(start, []):
            return cycle
    return None


def test_the_package_imports_without_a_cycle():
    graph = import_graph(ROOT, "dynbatch_kernels")
    backends = {f"dynbatch_kernels.{name}" for name in ("triton", "cpp", "reference")}
    assert backends <= graph["dynbatch_kernels.backends"]  # the backends' imports by name are counted
    assert graph["dynbatch_kernels.columns"] == set()
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_check_sees_imports_in_functions_and_by_name(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from . import b\n")
    (pkg / "a.py").write_text("def f():\n    from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("import importlib\nimportlib.import_module('pkg.c')\n")
    (pkg / "c.py").write_text("from .a import f\n")
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.a"] == {"pkg.sub", "pkg.sub.b"} and graph["pkg.sub"] == {"pkg.sub.b"}
    assert find_cycle(graph) == ["pkg.a", "pkg.sub", "pkg.sub.b", "pkg.c", "pkg.a"]
