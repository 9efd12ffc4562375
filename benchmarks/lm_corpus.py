"""A real text corpus that needs no download: the Python standard library's own source, as bytes.

The ``*.py`` files under ``sysconfig.get_paths()["stdlib"]`` (``site-packages`` excluded), sorted by
relative path and split by file into training and validation with a permutation fixed by ``seed``. Each
side is the concatenation of its files' bytes (vocabulary 256: no tokenizer). The encoded tensors and a
description (Python version, file and byte counts, the split) are cached in one file under ``cache``.
"""

from __future__ import annotations

import platform
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

CACHE = Path(__file__).resolve().parent.parent / "runs"


@dataclass(frozen=True)
class Corpus:
    """Training and validation bytes (uint8 tensors) and how they were made."""

    train: torch.Tensor
    val: torch.Tensor
    meta: dict


def stdlib_files() -> tuple[Path, list[str]]:
    """The standard library's directory and its ``*.py`` files (relative paths, sorted), no site-packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p.relative_to(root).as_posix() for p in root.rglob("*.py") if "site-packages" not in p.parts
    )
    return root, files


def split_files(files: list[str], val_fraction: float = 0.1, seed: int = 0) -> tuple[list[str], list[str]]:
    """(train, val): a seeded permutation of ``files``; the first ``val_fraction`` of it is validation."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction: expected a value in (0, 1), got {val_fraction}")
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed)).tolist()
    num_val = max(1, round(val_fraction * len(files)))
    return sorted(files[i] for i in order[num_val:]), sorted(files[i] for i in order[:num_val])


def load_corpus(cache: Path = CACHE, val_fraction: float = 0.1, seed: int = 0) -> Corpus:
    """The split corpus, read from ``cache`` when it was encoded before with the same settings."""
    version = platform.python_version()
    path = cache / f"lm_corpus-py{version}-val{val_fraction:g}-seed{seed}.pt"
    if path.exists():
        return Corpus(**torch.load(path))
    root, files = stdlib_files()
    train_files, val_files = split_files(files, val_fraction, seed)

    def encode(names: list[str]) -> torch.Tensor:
        data = b"".join((root / name).read_bytes() for name in names)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)

    train, val = encode(train_files), encode(val_files)
    meta = {
        "python": version,
        "stdlib": str(root),
        "files": len(files),
        "train_files": len(train_files),
        "val_files": len(val_files),
        "train_bytes": len(train),
        "val_bytes": len(val),
        "val_fraction": val_fraction,
        "split_seed": seed,
    }
    cache.mkdir(parents=True, exist_ok=True)
    torch.save({"train": train, "val": val, "meta": meta}, path)
    return Corpus(train, val, meta)
