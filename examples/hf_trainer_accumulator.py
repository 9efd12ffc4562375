"""transformers' Trainer with a GradientAccumulator: a batch policy decides when the optimizer steps.

Trainer runs one micro-batch per Trainer step (``gradient_accumulation_steps=1``); the accumulator sums
the micro-batch gradients and, when its policy fires, applies the batch through the real optimizer. Copy
``PolicyStep`` and ``AccumulatorTrainer``; docs/huggingface.md states what they do and do not cover.

Run (CPU, a tiny GPT-2 initialised at random, trained on the bytes of this file; nothing is downloaded)::

    python examples/hf_trainer_accumulator.py --micro-batches 48

It prints the batch size (samples per optimizer step) the policy chose for each step.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from dynbatch_kernels import AnglePolicy, GradientAccumulator
from dynbatch_kernels.batching import SqrtRule, StepRecord
from dynbatch_kernels.optim import FusedLAMB


class PolicyStep(torch.optim.Optimizer):
    """The optimizer Trainer holds: its ``step()`` (called by Trainer after every micro-batch) applies the
    accumulated batch through the accumulator when the policy fired, and otherwise does nothing.

    ``param_groups``, ``state`` and ``state_dict`` are the real optimizer's, so Trainer's LR scheduler sets
    the real learning rates and its checkpoints hold the real optimizer state. Like accelerate's own
    optimizer wrapper it does not call ``Optimizer.__init__``: it owns no parameters.
    """

    def __init__(self, accumulator: GradientAccumulator):
        self.accumulator = accumulator
        self.optimizer = accumulator.optimizer
        self.ready = False  # set by AccumulatorTrainer.training_step from accumulate()'s answer

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @property
    def state(self) -> dict:
        return self.optimizer.state

    @property
    def defaults(self) -> dict[str, Any]:
        return self.optimizer.defaults

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to do: the accumulator clears the gradients it takes in."""

    def step(self, closure: None = None) -> StepRecord | None:
        if closure is not None:
            raise ValueError("closure: not supported (the accumulator owns the backward passes)")
        if not self.ready:
            return None
        self.ready = False
        return self.accumulator.step()


class AccumulatorTrainer(Trainer):
    """A ``Trainer`` whose optimizer steps when ``accumulator``'s batch policy says so.

    Pass ``accumulator=GradientAccumulator(optimizer, policy, ...)`` instead of ``optimizers``;
    ``lr_scheduler`` (optional) is Trainer's second ``optimizers`` entry, built over the real optimizer.
    Trainer's steps (``max_steps``, ``global_step``, logging, saving, the LR schedule) count micro-batches;
    ``accumulator.history`` has one record per optimizer step. Requires ``gradient_accumulation_steps=1``
    and ``max_grad_norm=0`` (clip with the optimizer's or the accumulator's ``max_grad_norm``: Trainer's
    clipping would see only the last micro-batch's gradient).
    """

    def __init__(self, *args: Any, accumulator: GradientAccumulator, lr_scheduler: Any = None, **kwargs: Any):
        if "optimizers" in kwargs:
            raise TypeError(
                "optimizers: pass accumulator= (the optimizer it drives) and lr_scheduler= instead"
            )
        self.accumulator = accumulator
        self.policy_step = PolicyStep(accumulator)
        super().__init__(*args, optimizers=(self.policy_step, lr_scheduler), **kwargs)
        if self.args.gradient_accumulation_steps != 1:
            raise ValueError(
                "gradient_accumulation_steps: expected 1 (the batch policy decides when to step), "
                f"got {self.args.gradient_accumulation_steps}"
            )
        if self.args.max_grad_norm:
            raise ValueError(
                f"max_grad_norm: expected 0 (Trainer would clip a single micro-batch's gradient), got "
                f"{self.args.max_grad_norm}; clip the accumulated gradient with the optimizer's or the "
                "accumulator's max_grad_norm"
            )

    def training_step(
        self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        """Trainer's forward and backward on one micro-batch, then hand its gradient to the accumulator."""
        num_samples = len(next(v for v in inputs.values() if isinstance(v, torch.Tensor)))
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.policy_step.ready = self.accumulator.accumulate(num_samples=num_samples, loss=loss)
        return loss


class ByteBlocks(torch.utils.data.Dataset):
    """Consecutive ``length``-byte blocks of a file as causal-LM samples (tokens: bytes mod ``vocab``)."""

    def __init__(self, path: Path, length: int, vocab: int):
        tokens = torch.tensor(list(path.read_bytes()), dtype=torch.long) % vocab
        self.blocks = tokens[: len(tokens) // length * length].view(-1, length)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


#: The batch size at which the LR rule gives the optimizer's own lr.
BATCH_REF = 32


def tiny_gpt2(seq_len: int = 32, vocab: int = 64, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab,
        n_positions=seq_len,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


def main(
    micro_batches: int = 48,
    micro_batch_size: int = 4,
    max_samples: int = 64,
    lr: float = 1e-3,
    output_dir: str | None = None,
    seed: int = 0,
) -> list[StepRecord]:
    """Train for ``micro_batches`` Trainer steps; print and return the accumulator's step records."""
    model = tiny_gpt2(seed=seed)
    data = ByteBlocks(Path(__file__), length=model.config.n_positions, vocab=model.config.vocab_size)
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() <= 1]
    optimizer = FusedLAMB(
        [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr, max_grad_norm=1.0
    )
    policy = AnglePolicy(min_samples=micro_batch_size, max_samples=max_samples)
    # the lr follows the batch size: lr * sqrt(B / 32) at a step of B samples (times the scheduler's factor)
    accumulator = GradientAccumulator(optimizer, policy, SqrtRule(batch_ref=BATCH_REF), model=model)
    with tempfile.TemporaryDirectory() as scratch:
        args = TrainingArguments(
            output_dir=output_dir or scratch,
            max_steps=micro_batches,
            per_device_train_batch_size=micro_batch_size,
            gradient_accumulation_steps=1,
            max_grad_norm=0.0,
            lr_scheduler_type="constant",
            use_cpu=True,
            seed=seed,
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
        )
        trainer = AccumulatorTrainer(model=model, args=args, train_dataset=data, accumulator=accumulator)
        trainer.train()
    history = list(accumulator.history)
    print(f"{micro_batches} micro-batches of {micro_batch_size} -> {len(history)} optimizer steps")
    for record in history:
        print(f"step {record.step}: {record.samples} samples, loss {record.loss:.4f}, lr {record.lr:.2e}")
    if accumulator.accumulated:
        print(f"({accumulator.accumulated} micro-batches accumulated after the last step, not applied)")
    return history


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--micro-batches", type=int, default=48, help="Trainer steps (max_steps)")
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--max-samples", type=int, default=64, help="the policy's largest batch")
    parser.add_argument("--lr", type=float, default=1e-3)
    cli = parser.parse_args()
    main(cli.micro_batches, cli.micro_batch_size, cli.max_samples, cli.lr)
