"""The command line: ``python -m dynbatch_kernels train [options]`` (the main job).

``train`` trains the digits MLP under each chosen batch policy (default: angle, CABS, noise scale and the
fixed baseline), with a progress bar, then prints a summary table and writes a plot. It needs the
``demo`` extra (tqdm, matplotlib, scikit-learn) and says so when one is missing.
"""

from __future__ import annotations

import argparse
import logging
import math
from dataclasses import replace
from pathlib import Path

import torch

from dynbatch_kernels.extras import install_hint, missing
from dynbatch_kernels.train import (
    LR_RULE_NAMES,
    OPTIMIZERS,
    POLICIES,
    TrainConfig,
    format_table,
    micro_batches_per_run,
    plot_runs,
    train,
)


def _config(args: argparse.Namespace) -> TrainConfig:
    """The options as a (validated) config; the policy is set per run."""
    return TrainConfig(
        policy="fixed",
        optimizer=args.optimizer,
        lr_rule=args.lr_rule,
        lr=args.lr,
        epochs=args.epochs,
        micro_batch=args.micro_batch,
        batch=args.batch,
        min_batch=args.min_batch,
        max_batch=args.max_batch,
        lr_ref_batch=args.lr_ref_batch,
        cabs_c=args.cabs_c,
        seed=args.seed,
        device=args.device,
    )


def run_train(args: argparse.Namespace, base: TrainConfig) -> None:
    from tqdm import tqdm  # the demo extra, checked by main()

    policies = POLICIES if args.policy == "all" else (args.policy,)
    runs = []
    for policy in policies:
        config = replace(base, policy=policy)
        with tqdm(total=micro_batches_per_run(config), desc=f"{policy:<6}", unit="mb", leave=True) as bar:

            def progress(done: int, info: dict, bar: tqdm = bar) -> None:
                bar.update(done - bar.n)
                if done % 10 == 0:
                    angle = "-" if math.isnan(info["angle"]) else f"{info['angle']:.1f}"
                    bar.set_postfix(B=info["batch"], angle=angle, loss=f"{info['loss']:.3f}", refresh=False)

            runs.append(train(config, progress))
    print()
    print(format_table(runs))
    if args.plot is not None:
        print(f"\nplot: {plot_runs(runs, args.plot)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dynbatch_kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="the main job: digits MLP under each batch policy")
    p.add_argument("--policy", choices=("all", *POLICIES), default="all")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="lamb", help="lamb: FusedLAMB")
    p.add_argument("--lr-rule", choices=LR_RULE_NAMES, default="none")
    p.add_argument("--lr", type=float, default=None, help="lr at --lr-ref-batch (default: per optimizer)")
    p.add_argument("--lr-ref-batch", type=int, default=TrainConfig.lr_ref_batch, help="LR rules' reference")
    p.add_argument("--epochs", type=float, default=TrainConfig.epochs)
    p.add_argument("--micro-batch", type=int, default=TrainConfig.micro_batch)
    p.add_argument("--batch", type=int, default=TrainConfig.batch, help="the fixed policy's batch size")
    p.add_argument("--min-batch", type=int, default=TrainConfig.min_batch)
    p.add_argument("--max-batch", type=int, default=TrainConfig.max_batch)
    p.add_argument("--cabs-c", type=float, default=TrainConfig.cabs_c, help="CABS factor c")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--plot", type=Path, default=Path("runs/main.png"), help="PNG path")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (the model is tiny: 1 is fastest)")
    p.add_argument("-v", "--verbose", action="store_true", help="log every step")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("dynbatch_kernels").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    torch.set_num_threads(args.threads)
    if args.command == "train":
        try:
            config = _config(args)
        except ValueError as err:
            p.error(str(err))
        absent = missing("demo")
        if absent:
            needs = f"the main job needs {', '.join(absent)} (the demo extra)"
            p.exit(1, f"{p.prog}: error: {needs}: `{install_hint('demo')}`\n")
        run_train(args, config)


if __name__ == "__main__":
    main()
