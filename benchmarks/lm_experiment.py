"""Fixed against adaptive batches on a real workload: a byte-level GPT on the Python standard library.

``python -m benchmarks.lm_experiment [--quick] [--seeds 3] [--samples N] [--out benchmarks/results]``

Data: :mod:`benchmarks.lm_corpus` (no download). Model: :class:`benchmarks.lm_model.TinyGPT`. Every run
draws random windows of ``context + 1`` bytes in micro-batches of 16 sequences (seed ``s``: the same
initial weights and data order for every method), trains for the same budget of samples (sequences; tokens
= samples x context) through :class:`~dynbatch_kernels.batching.GradientAccumulator`, and evaluates the
validation loss on fixed windows ``--evals`` times along the way (not counted in the wall time). Three
separate comparisons:

- ``policies``: FusedLAMB with :class:`~dynbatch_kernels.batching.SurgeRule` (reference: the medium batch)
  at fixed small, medium and large batches and under the angle, CABS and noise-scale policies (bounded to
  ``[--min-batch, --max-batch]``). The lr is tuned over ``--lamb-lrs`` at the medium batch (seed 0, the
  lowest final validation loss; rows ``lr-tuning``) and the rule scales it to every batch.
- ``optimizers``: FusedLAMB and LAMBC (``trust_clip=(0, 1)``) at the tuned lr, and
  ``torch.optim.AdamW(fused=True)`` at ``--adamw-lr``, at the large fixed batch.
- ``extrap``: Nesterov SGD, ExtrapSGD ``mode="local"`` (two gradients per sample: the same samples, twice
  the compute) and ``mode="past"`` at the large fixed batch (``--sgd-lr``).

The target is the mean final validation loss of the medium fixed batch; samples, tokens, steps and
training seconds to it are read at the first evaluation at or below it. Writes into ``--out``:
``lm_experiment.csv`` (one row per run), ``lm_experiment.json`` (settings, corpus, environment),
``lm_curves.csv`` (the evaluations), ``lm_trajectories.csv`` (batch size, lr and noise scale per step),
``lm_experiment.md`` (the tables, and the simulated savings at scale of :mod:`benchmarks.lm_scaling`) and
``lm_experiment.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import statistics
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from benchmarks import lm_scaling
from benchmarks.common import RESULTS, environment
from benchmarks.convergence import markdown
from benchmarks.lm_corpus import CACHE, load_corpus
from benchmarks.lm_model import TinyGPT, lm_loss
from benchmarks.lm_plot import plot
from dynbatch_kernels.batching import GradientAccumulator, SurgeRule
from dynbatch_kernels.optim import ExtrapSGD, FusedLAMB
from dynbatch_kernels.train import TrainConfig, _TrainingClock, make_policy

MICRO = 16
ADAPTIVE = ("angle", "cabs", "noise")
WALL_NOTE = "wall times are valid only when the run had the cores to itself"
#: Settings of the full run (sized for 2 idle cores, about an hour) and of ``--quick`` (CI, < 2 minutes).
FULL = {
    "seeds": 3,
    "samples": 36864,
    "evals": 16,
    "val_seqs": 256,
    "context": 64,
    "width": 80,
    "layers": 3,
    "heads": 4,
    "batches": [32, 128, 512],
    "threads": 2,
}
QUICK = {
    **FULL,
    "seeds": 1,
    "samples": 2048,
    "evals": 4,
    "val_seqs": 32,
    "width": 32,
    "layers": 2,
    "threads": 1,  # a tiny model on a shared machine: a second thread only adds contention
}


@dataclass(frozen=True)
class Method:
    """One configuration: optimizer, batch policy, its fixed (or initial) batch, lr, LR rule or none."""

    comparison: str
    name: str
    optimizer: str
    policy: str
    batch: int
    lr: float
    lr_rule: bool = False


@dataclass
class Run:
    """A finished run: evaluations ``(samples, steps, train seconds, val loss in nats)`` and, per applied
    step, ``(batch, lr, noise scale)``."""

    method: Method
    seed: int
    curve: list[tuple[int, int, float, float]] = field(default_factory=list)
    trajectory: list[tuple[int, float, float]] = field(default_factory=list)

    @property
    def final(self) -> float:
        return self.curve[-1][3]


def make_optimizer(name: str, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """lamb, lambc, adamw, nesterov, extrap-local or extrap-past."""
    params = list(model.parameters())
    if name in ("lamb", "lambc"):
        return FusedLAMB(params, lr=lr, trust_clip=(0.0, 1.0) if name == "lambc" else None)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.01, fused=True)
    if name == "nesterov":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True)
    return ExtrapSGD(params, lr=lr, mode=name.removeprefix("extrap-"))


def windows(data: torch.Tensor, context: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless micro-batches of ``MICRO`` random windows of ``context + 1`` bytes (int64)."""
    offsets = torch.arange(context + 1)
    while True:
        starts = torch.randint(len(data) - context, (MICRO, 1), generator=generator)
        yield data[starts + offsets].long()


def val_windows(data: torch.Tensor, context: int, count: int) -> torch.Tensor:
    """``count`` windows evenly spaced over the validation bytes."""
    starts = torch.linspace(0, len(data) - context - 1, count).long()
    return data[starts[:, None] + torch.arange(context + 1)].long()


@torch.no_grad()
def val_loss(model: torch.nn.Module, val: torch.Tensor) -> float:
    return statistics.mean(lm_loss(model, chunk).item() for chunk in val.split(64))


def train_run(method: Method, seed: int, train: torch.Tensor, val: torch.Tensor, args) -> Run:
    """Train ``method`` for ``args.samples`` samples, evaluating ``args.evals`` times (and at the start)."""
    torch.manual_seed(seed)
    model = TinyGPT(args.context, args.width, args.layers, args.heads)
    opt = make_optimizer(method.optimizer, model, method.lr)
    config = TrainConfig(
        policy=method.policy,
        micro_batch=MICRO,
        batch=method.batch,
        min_batch=args.min_batch,
        max_batch=args.max_batch,
        seed=seed,
    )
    rule = SurgeRule(args.batches[1]) if method.lr_rule else None
    acc = GradientAccumulator(opt, make_policy(config), rule, model=model, history_size=None)
    stream = windows(train, args.context, torch.Generator().manual_seed(seed))
    at_iterate = getattr(opt, "swap_to_iterate", contextlib.nullcontext)  # ExtrapSGD "past" holds u
    run, clock = Run(method, seed), _TrainingClock()
    every = args.samples / args.evals
    seen, samples, steps, next_eval = 0, 0, 0, every

    def evaluate() -> None:
        with clock.paused(), at_iterate():
            run.curve.append((samples, steps, clock.seconds, val_loss(model, val)))

    evaluate()
    while seen < args.samples:
        group = None
        if method.optimizer == "extrap-local":  # the gradient at w over the step's batch, then u
            if seen + method.batch > args.samples:
                break
            group = [next(stream) for _ in range(method.batch // MICRO)]
            for xb in group:
                (lm_loss(model, xb) / len(group)).backward()
            opt.extrapolate()
        for xb in group or stream:
            loss = lm_loss(model, xb)
            loss.backward()
            seen += MICRO
            if acc.accumulate(MICRO, loss.detach()):
                record = acc.step()
                samples, steps = samples + record.samples * record.applied, steps + record.applied
                if samples >= next_eval:
                    next_eval = every * (samples // every + 1)
                    evaluate()
                break
            if seen >= args.samples:
                break
    if run.curve[-1][0] != samples:
        evaluate()
    run.trajectory = [(r.samples, r.lr, r.noise_scale) for r in acc.history if r.applied]
    acc.close()
    return run


def methods(args, lamb_lr: float) -> dict[str, list[Method]]:
    """The methods of each comparison (FusedLAMB's lr is the tuned one)."""
    small, _, large = args.batches
    fixed = [Method("policies", f"fixed-{b}", "lamb", "fixed", b, lamb_lr, True) for b in args.batches]
    adaptive = [Method("policies", p, "lamb", p, small, lamb_lr, True) for p in ADAPTIVE]
    lrs = {"lamb": lamb_lr, "lambc": lamb_lr, "adamw": args.adamw_lr}
    return {
        "policies": fixed + adaptive,
        "optimizers": [Method("optimizers", f"{o}-{large}", o, "fixed", large, lr) for o, lr in lrs.items()],
        "extrap": [
            Method("extrap", f"{o}-{large}", o, "fixed", large, args.sgd_lr)
            for o in ("nesterov", "extrap-local", "extrap-past")
        ],
    }


def run_all(args, train: torch.Tensor, val: torch.Tensor) -> list[Run]:
    """LR tuning (seed 0 at the medium batch), then every comparison for every seed."""

    def one(method: Method, seed: int) -> Run:
        run = train_run(method, seed, train, val, args)
        print(
            f"{method.comparison:<10} {method.name:<18} lr {method.lr:<7g} seed {seed}: val "
            f"{run.final / math.log(2):.3f} bits/byte, {run.curve[-1][1]} steps, {run.curve[-1][2]:.1f} s",
            flush=True,
        )
        return run

    medium = args.batches[1]
    tuning = [
        one(Method("lr-tuning", f"fixed-{medium}", "lamb", "fixed", medium, lr, True), 0)
        for lr in args.lamb_lrs
    ]
    best = min(tuning, key=lambda r: r.final)
    runs = list(tuning)
    for comparison, group in methods(args, best.method.lr).items():
        for seed in range(args.seeds):
            for method in group:
                reuse = seed == 0 and replace(best.method, comparison=comparison) == method
                runs.append(replace(best, method=method) if reuse else one(method, seed))
    return runs


def to_target(run: Run, target: float) -> tuple[int, int, float] | None:
    """(samples, steps, seconds) at the first evaluation at or below ``target``."""
    return next((row[:3] for row in run.curve if row[3] <= target), None)


def run_rows(runs: list[Run], target: float, context: int) -> list[dict]:
    rows = []
    for run in runs:
        hit = to_target(run, target)
        samples, steps, seconds = hit or (math.nan, math.nan, math.nan)
        batches, lrs = [b for b, _, _ in run.trajectory], [lr for _, lr, _ in run.trajectory]
        rows.append(
            {
                **asdict(run.method),
                "seed": run.seed,
                "target_bpb": target / math.log(2),
                "reached": hit is not None,
                "samples_to_target": samples,
                "tokens_to_target": samples * context,
                "steps_to_target": steps,
                "wall_s_to_target": seconds,
                "final_bpb": run.final / math.log(2),
                "samples": run.curve[-1][0],
                "tokens": run.curve[-1][0] * context,
                "steps": run.curve[-1][1],
                "mean_batch": statistics.mean(batches) if batches else math.nan,
                "mean_lr": statistics.mean(lrs) if lrs else math.nan,
                "wall_s": run.curve[-1][2],
            }
        )
    return rows


def summary(rows: list[dict]) -> list[dict]:
    """Per method: runs reaching the target, mean [min-max] of what it took, final bits per byte."""

    def spread(group: list[dict], key: str, fmt: str) -> str:
        values = [r[key] for r in group]
        return f"{statistics.mean(values):{fmt}} [{min(values):{fmt}}-{max(values):{fmt}}]" if values else "-"

    out = []
    for name, lr in dict.fromkeys((r["name"], r["lr"]) for r in rows):
        group = [r for r in rows if (r["name"], r["lr"]) == (name, lr)]
        reached = [r for r in group if r["reached"]]
        out.append(
            {
                "method": name,
                "lr": f"{lr:g}" + (" (surge)" if group[0]["lr_rule"] else ""),
                "reached": f"{len(reached)}/{len(group)}",
                "samples to target": spread(reached, "samples_to_target", ".0f"),
                "tokens to target": spread(reached, "tokens_to_target", ".3g"),
                "steps to target": spread(reached, "steps_to_target", ".0f"),
                "train s to target*": spread(reached, "wall_s_to_target", ".1f"),
                "final bits/byte": spread(group, "final_bpb", ".3f"),
                "mean batch": f"{statistics.mean(r['mean_batch'] for r in group):.0f}",
                "mean lr applied": f"{statistics.mean(r['mean_lr'] for r in group):.3g}",
                "steps": f"{statistics.mean(r['steps'] for r in group):.0f}",
                "train s*": spread(group, "wall_s", ".1f"),
            }
        )
    return out


def scaling(runs: list[Run], medium: int, params: int, segments: int) -> list[dict]:
    """The simulated savings of each adaptive policy over the medium fixed batch (mean over seeds)."""
    out = []
    for name in ADAPTIVE:
        mine = [r for r in runs if r.method.comparison == "policies" and r.method.name == name]
        for workers in lm_scaling.WORKERS:
            pairs = []
            for run in mine:
                trajectory = [(b, noise) for b, _, noise in run.trajectory]
                pairs.append(
                    [
                        lm_scaling.replay(trajectory, workers, params, segments, fixed=f)
                        for f in (medium, None)
                    ]
                )
            fixed_steps, steps = (statistics.mean(p[i].steps for p in pairs) for i in (0, 1))
            fixed_mb, mb = (statistics.mean(p[i].allreduce_bytes for p in pairs) / 2**20 for i in (0, 1))
            fixed_samples, samples = (statistics.mean(p[i].samples for p in pairs) for i in (0, 1))
            out.append(
                {
                    "policy": name,
                    "workers": workers,
                    f"steps fixed-{medium}": f"{fixed_steps:.0f}",
                    "steps policy": f"{steps:.0f}",
                    "steps saved": f"{1 - steps / fixed_steps:.0%}",
                    f"all-reduce MiB/worker fixed-{medium}": f"{fixed_mb:.1f}",
                    "all-reduce MiB/worker policy": f"{mb:.1f}",
                    "all-reduce saved": f"{1 - mb / fixed_mb:.0%}",
                    "samples policy / fixed": f"{samples / fixed_samples:.2f}",
                }
            )
    return out


def write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def report(args, runs: list[Run], corpus_meta: dict, target: float, params: int, segments: int) -> str:
    """The Markdown report: settings, one table per comparison, the LR tuning and the simulation."""
    env = environment(torch.device("cpu"))
    rows = run_rows(runs, target, args.context)
    medium = args.batches[1]
    titles = {
        "lr-tuning": f"FusedLAMB lr tuning at fixed-{medium} (seed 0, SurgeRule)",
        "policies": "Batch policies (FusedLAMB, SurgeRule from the tuned lr at the medium batch)",
        "optimizers": f"Optimizers at fixed batch {args.batches[2]} (LAMB: the tuned lr; no LR rule)",
        "extrap": f"ExtrapSGD against Nesterov SGD at fixed batch {args.batches[2]} (no LR rule)",
    }
    parts = [
        f"# Byte-level GPT on the Python {corpus_meta['python']} standard library: fixed against adaptive "
        "batches\n",
        f"Corpus: {corpus_meta['files']} `*.py` files of `{corpus_meta['stdlib']}` (no site-packages), split "
        f"by file with seed {corpus_meta['split_seed']}: {corpus_meta['train_files']} files / "
        f"{corpus_meta['train_bytes']:,} bytes train, {corpus_meta['val_files']} files / "
        f"{corpus_meta['val_bytes']:,} bytes validation. Model: TinyGPT context {args.context}, width "
        f"{args.width}, {args.layers} layers, {args.heads} heads, {params:,} parameters. Budget "
        f"{args.samples:,} sequences ({args.samples * args.context:,} tokens) per run in micro-batches of "
        f"{MICRO}, {args.seeds} seeds, {args.evals} evaluations on {args.val_seqs} validation windows. "
        f"{env['device']}, torch {env['torch']}, {env['date']}.\n",
        f"Target: {target / math.log(2):.3f} bits/byte, the mean final validation loss of fixed-{medium}. "
        "Mean [min-max] over the runs that reached it, read at the first evaluation at or below it. "
        f"*Train seconds exclude evaluations; {WALL_NOTE}.\n",
    ]
    for comparison, title in titles.items():
        group = [r for r in rows if r["comparison"] == comparison]
        parts.append(markdown(summary(group), f"## {title}"))
    sim = scaling(runs, medium, params, segments)
    parts.append(markdown(sim, "## Simulated at scale (a model, not a measurement)"))
    parts.append(lm_scaling.__doc__.split("\n\n", 1)[1].replace("\n", " ").strip())
    parts.append(
        f"Here: each policy's measured trajectories (batch and noise scale per step, every seed), against "
        f"fixed-{medium} replayed on the same noise scales, {params:,} parameters in {segments} segments, "
        "one sequence per worker per micro-batch round (counted in sequences, whatever their length). "
        "Savings are relative to the fixed batch at the same number of workers.\n"
    )
    return "\n".join(parts)


def write_results(args, runs: list[Run], corpus_meta: dict) -> None:
    """The CSVs, the settings (JSON), the Markdown report and the figure, into ``args.out``."""
    medium = ("policies", f"fixed-{args.batches[1]}")
    target = statistics.mean(r.final for r in runs if (r.method.comparison, r.method.name) == medium)
    model = TinyGPT(args.context, args.width, args.layers, args.heads)
    params, segments = sum(p.numel() for p in model.parameters()), len(list(model.parameters()))
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "lm_experiment.csv", run_rows(runs, target, args.context))
    curves = [
        {**asdict(r.method), "seed": r.seed, "samples": s, "tokens": s * args.context, "steps": k,
         "train_s": t, "val_bpb": loss / math.log(2)}
        for r in runs
        for s, k, t, loss in r.curve
    ]  # fmt: skip
    write_csv(args.out / "lm_curves.csv", curves)
    steps = [
        {"comparison": r.method.comparison, "name": r.method.name, "seed": r.seed, "step": i, "batch": b,
         "lr": lr, "noise_scale": noise}
        for r in runs
        for i, (b, lr, noise) in enumerate(r.trajectory)
    ]  # fmt: skip
    write_csv(args.out / "lm_trajectories.csv", steps)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    meta = {"environment": environment(torch.device("cpu")), "corpus": corpus_meta, "settings": settings}
    (args.out / "lm_experiment.json").write_text(json.dumps({**meta, "params": params}, indent=1))
    text = report(args, runs, corpus_meta, target, params, segments)
    (args.out / "lm_experiment.md").write_text(text)
    plot([r for r in runs if r.method.comparison != "lr-tuning"], args.out / "lm_experiment.png")
    print()
    print(text)
    print(f"wrote {args.out}/lm_experiment.{{csv,json,md,png}}, lm_curves.csv, lm_trajectories.csv")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny model and budget, one seed (CI)")
    parser.add_argument("--seeds", type=int)
    parser.add_argument("--samples", type=int, help="budget per run, in sequences")
    parser.add_argument("--evals", type=int, help="validation evaluations per run")
    parser.add_argument("--val-seqs", type=int, help="validation windows")
    parser.add_argument("--context", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--layers", type=int)
    parser.add_argument("--heads", type=int)
    parser.add_argument("--batches", type=int, nargs=3, help="small, medium, large fixed batches")
    parser.add_argument("--min-batch", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=1024)
    parser.add_argument("--lamb-lrs", type=float, nargs=3, default=[2e-3, 4e-3, 8e-3], help="to tune")
    parser.add_argument("--adamw-lr", type=float, default=3e-3)
    parser.add_argument("--sgd-lr", type=float, default=0.1, help="Nesterov SGD and ExtrapSGD")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--cache", type=Path, default=CACHE, help="folder for the encoded corpus")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    torch.set_num_threads(args.threads)
    corpus = load_corpus(args.cache)
    val = val_windows(corpus.val, args.context, args.val_seqs)
    runs = run_all(args, corpus.train, val)
    write_results(args, runs, corpus.meta)


if __name__ == "__main__":
    main()
