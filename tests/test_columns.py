"""The table columns: one Python home (dynbatch_kernels.columns), which the C++ kernels and the ops match."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

from dynbatch_kernels import columns, ops

PYTHON_COLUMNS = {name: value for name, value in vars(columns).items() if name.isupper()}
#: Each table's size constant and its columns.
TABLES = {
    "NUM_ACC_SUMS": ["ACC_DOT", "GRAD_SQ", "ACC_OLD_SQ", "ACC_NEW_SQ"],
    "NUM_EXTRAP_HYPER": [
        "EXTRAP_LR",
        "EXTRAP_GAMMA",
        "EXTRAP_MOMENTUM",
        "EXTRAP_WEIGHT_DECAY",
        "EXTRAP_NESTEROV",
        "EXTRAP_ACTIVE",
    ],
    "NUM_LAMB_HYPER": [
        "LAMB_LR",
        "LAMB_BETA1",
        "LAMB_BETA2",
        "LAMB_EPS",
        "LAMB_WEIGHT_DECAY",
        "LAMB_RATIO_MIN",
        "LAMB_RATIO_MAX",
        "LAMB_ADAPT",
        "LAMB_BIAS_CORRECTION",
        "LAMB_MAX_GRAD_NORM",
        "LAMB_ACTIVE",
    ],
    "NUM_LAMB_STATS": ["LAMB_W_SQ", "LAMB_U_SQ", "LAMB_G_SQ", "LAMB_RATIO"],
}


def test_the_extension_registers_the_python_columns():
    """csrc/columns.h, as the built extension exports it, matches columns.py name for name."""
    extension = importlib.import_module("dynbatch_kernels._C")  # built by `make test`: no skip
    assert extension.COLUMNS == PYTHON_COLUMNS


def test_each_table_numbers_its_columns_from_zero():
    assert {name for names in TABLES.values() for name in names} | set(TABLES) == set(PYTHON_COLUMNS)
    for size, names in TABLES.items():
        assert sorted(PYTHON_COLUMNS[name] for name in names) == list(range(PYTHON_COLUMNS[size]))


def test_ops_reexports_the_same_constants():
    for name, value in PYTHON_COLUMNS.items():
        assert getattr(ops, name) == value and name in ops.__all__


def test_the_hyper_rows_are_one_table_row_long():
    assert len(ops.lamb_hyper_row(lr=1.0)) == columns.NUM_LAMB_HYPER
    assert len(ops.extrap_hyper_row(lr=1.0, extrapolation_lr=1.0)) == columns.NUM_EXTRAP_HYPER


def test_columns_module_imports_nothing():
    tree = ast.parse(Path(columns.__file__).read_text())
    assert not [node for node in ast.walk(tree) if isinstance(node, ast.Import | ast.ImportFrom)]
