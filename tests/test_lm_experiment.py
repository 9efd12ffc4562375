"""The language-model experiment: corpus split, model at initialisation, the simulation, and a tiny run."""

from __future__ import annotations

import csv
import math

import torch
from synthetic import one_thread  # noqa: F401  (an autouse fixture)

from benchmarks.lm_corpus import split_files, stdlib_files
from benchmarks.lm_experiment import FULL, main
from benchmarks.lm_model import TinyGPT, lm_loss
from benchmarks.lm_scaling import replay


def test_corpus_split_is_deterministic_and_disjoint():
    _, files = stdlib_files()
    assert len(files) > 100 and not any("site-packages" in f for f in files)
    train, val = split_files(files)
    assert (train, val) == split_files(list(files))
    assert not set(train) & set(val) and sorted(train + val) == files
    assert 0.05 < len(val) / len(files) < 0.15
    assert split_files(files, seed=1) != (train, val)


def test_loss_at_initialisation_is_near_uniform():
    root, files = stdlib_files()
    text = b"".join((root / name).read_bytes() for name in files[:20])
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    context = FULL["context"]
    batch = data[: 32 * (context + 1)].view(32, context + 1)
    torch.manual_seed(0)
    model = TinyGPT(context, FULL["width"], FULL["layers"], FULL["heads"])
    assert any(name.startswith("layers.1.") for name, _ in model.named_parameters())
    with torch.no_grad():
        assert abs(lm_loss(model, batch).item() - math.log(256)) < 0.3


def test_replay_counts_steps_and_traffic():
    trajectory = [(32, 32.0)] * 10  # half an ideal step each: progress 5
    same = replay(trajectory, workers=8, params=1000, segments=4)
    assert (same.steps, same.samples, same.rounds) == (10, 320, 40)
    assert same.allreduce_bytes == 2 * 7 / 8 * (10 * 4000 + 40 * 4 * 19)
    larger = replay(trajectory, workers=8, params=1000, segments=4, fixed=64)  # 2/3 per step
    assert (larger.steps, larger.samples) == (8, 512)
    wide = replay(trajectory, workers=64, params=1000, segments=4)  # 32 rounded up to 64: as fixed=64
    assert (wide.steps, wide.samples) == (8, 512)


def test_quick_experiment_writes_its_tables(tmp_path):
    main(
        ["--quick", "--samples", "256", "--batches", "16", "32", "64", "--max-batch", "64", "--evals", "2",
         "--val-seqs", "16", "--threads", "1", "--cache", str(tmp_path), "--out", str(tmp_path)]
    )  # fmt: skip
    with (tmp_path / "lm_experiment.csv").open() as f:
        rows = list(csv.DictReader(f))
    counts = {c: sum(r["comparison"] == c for r in rows) for c in ("lr-tuning", "policies", "optimizers")}
    assert counts == {"lr-tuning": 3, "policies": 6, "optimizers": 3} and len(rows) == 15
    assert all(0 < float(r["final_bpb"]) < 9 and int(r["samples"]) <= 256 for r in rows)
    table = (tmp_path / "lm_experiment.md").read_text()
    for title in ("FusedLAMB lr tuning", "Batch policies", "Optimizers", "ExtrapSGD", "Simulated at scale"):
        assert f"## {title}" in table
    assert "valid only when the run had the cores to itself" in table
    assert (tmp_path / "lm_experiment.png").read_bytes()[:4] == b"\x89PNG"
    for name in ("lm_trajectories.csv", "lm_curves.csv", "lm_experiment.json"):
        assert (tmp_path / name).stat().st_size > 100
