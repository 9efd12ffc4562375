"""A real client: transformers' Trainer (CPU, a tiny GPT-2 initialised at random, nothing downloaded).

FusedLAMB passed as ``optimizers=(FusedLAMB(...), None)`` against timm's ``Lamb`` on the same init, data
order and Trainer settings, and the GradientAccumulator recipe of ``examples/hf_trainer_accumulator.py``
(docs/huggingface.md).
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

from dynbatch_kernels import FixedPolicy, GradientAccumulator
from dynbatch_kernels.optim import FusedLAMB

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (requirements.txt pins it)"
)
pytest.importorskip("accelerate", reason="accelerate (Trainer needs it) is not installed")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "hf_trainer_accumulator.py"

#: Relative tolerance on the final weights: |w_ours - w_theirs| / |w_theirs|.
RTOL = 1e-4
#: Without autocast, the tighter bound on the updates: |dw_ours - dw_theirs| / |dw_theirs|, dw = w - w_init.
UPDATE_RTOL_FP32 = 1e-5
STEPS = 20
LR = 1e-3  # both optimizers' default


def load_example():
    """The example script as a module (``examples/`` is not a package)."""
    name = "_dynbatch_example_hf_trainer_accumulator"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, EXAMPLE)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


example = load_example()


class BigramBlocks(torch.utils.data.Dataset):
    """Synthetic sequences that no edit of a file changes, drawn from a fixed random bigram model with
    peaked rows (so there is something to learn). Records the order Trainer reads them in."""

    def __init__(self, count: int = 256, length: int = 32, vocab: int = 64, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        probs = torch.softmax(3.0 * torch.randn(vocab, vocab, generator=gen), dim=1)
        tokens = [torch.randint(0, vocab, (count,), generator=gen)]
        for _ in range(length - 1):
            tokens.append(torch.multinomial(probs[tokens[-1]], 1, generator=gen).squeeze(1))
        self.blocks = torch.stack(tokens, dim=1)
        self.order: list[int] = []

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        self.order.append(int(i))
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


def decay_groups(model: torch.nn.Module) -> list[dict]:
    """Weight decay (the optimizers' default 0.01) on matrices only, as Trainer's own grouping does."""
    params = list(model.parameters())
    return [
        {"params": [p for p in params if p.dim() > 1]},
        {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0},
    ]


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().double().flatten() for p in model.parameters()])


def run(tmp_path: Path, make_optimizer, trainer_cls=transformers.Trainer, **settings) -> dict:
    """Train the tiny GPT-2 (same init every call) with Trainer; return weights, data order and logs."""
    model = example.tiny_gpt2(seed=0)
    init = flat(model)
    data = BigramBlocks()
    options = {"max_steps": STEPS, "per_device_train_batch_size": 4, **settings}
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        use_cpu=True,
        seed=0,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        **options,
    )
    extra = make_optimizer(model)
    trainer = trainer_cls(model=model, args=args, train_dataset=data, **extra)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    return {"init": init, "weights": flat(model), "order": data.order, "logs": logs, "trainer": trainer}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize(
    "settings",
    [{}, {"gradient_accumulation_steps": 2}, {"bf16": True}],
    ids=["fp32", "accumulate2", "bf16"],
)
def test_fused_lamb_matches_timm_lamb_in_trainer(tmp_path, settings):
    """Same init, data order, schedule (Trainer's linear decay) and clipping (Trainer's max_grad_norm=1.0
    for both; neither optimizer clips itself): the final weights agree within RTOL."""
    peers = pytest.importorskip("benchmarks.peers", reason="run from the repository root (python -m pytest)")
    try:
        timm_lamb = peers.timm_lamb()
    except ImportError as err:
        pytest.skip(f"timm's Lamb is not available: {err}")

    def theirs(model):
        return {"optimizers": (timm_lamb(decay_groups(model), lr=LR, max_grad_norm=None), None)}

    def ours(model):
        return {"optimizers": (FusedLAMB(decay_groups(model), lr=LR), None)}

    reference = run(tmp_path / "timm", theirs, **settings)
    fused = run(tmp_path / "fused", ours, **settings)

    precision = "bf16" if settings.get("bf16") else "no"
    assert [r["trainer"].accelerator.mixed_precision for r in (reference, fused)] == [precision] * 2
    micro_batches = STEPS * settings.get("gradient_accumulation_steps", 1)
    # accelerate's data loader reads one batch ahead
    assert fused["order"] == reference["order"] and len(reference["order"]) >= micro_batches * 4
    assert len(fused["logs"]) == len(reference["logs"]) == STEPS
    norms = [[entry["grad_norm"] for entry in r["logs"]] for r in (reference, fused)]
    assert max(norms[0]) > 1.0, "Trainer's clipping at 1.0 never acted: the comparison does not cover it"
    torch.testing.assert_close(norms[1], norms[0], rtol=1e-2, atol=0)
    losses = [[entry["loss"] for entry in r["logs"]] for r in (reference, fused)]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-3, atol=0)

    moved = relative(reference["weights"], reference["init"])
    assert moved > 30 * RTOL, f"training barely moved the weights ({moved:.2e}): the check would be vacuous"
    difference = relative(fused["weights"], reference["weights"])
    # the same difference over the norm of the update, the sharper measure (printed for `pytest -s`)
    update = relative(fused["weights"] - fused["init"], reference["weights"] - reference["init"])
    print(f"\n{settings}: weights {difference:.2e}, update {update:.2e} (weights moved {moved:.2e})")
    assert difference <= RTOL, f"|w_fused - w_timm| / |w_timm| = {difference:.3e}"
    if not settings.get("bf16"):
        # float32 throughout: only rounding differs. Under bfloat16 autocast a last-bit difference in a
        # weight can round a matmul input the other way, and the updates can drift apart by up to ~1e-3.
        assert update <= UPDATE_RTOL_FP32, f"|dw_fused - dw_timm| / |dw_timm| = {update:.3e}"


def test_accumulator_recipe_with_a_fixed_policy_is_trainers_accumulation(tmp_path):
    """AccumulatorTrainer with FixedPolicy(8) over micro-batches of 4 takes the steps Trainer's own
    gradient_accumulation_steps=2 takes: same data order, same weights (constant lr, no clipping)."""
    settings = {"lr_scheduler_type": "constant", "max_grad_norm": 0.0}

    def plain(model):
        return {"optimizers": (FusedLAMB(decay_groups(model), lr=LR), None)}

    def recipe(model):
        optimizer = FusedLAMB(decay_groups(model), lr=LR)
        return {"accumulator": GradientAccumulator(optimizer, FixedPolicy(8), model=model)}

    reference = run(tmp_path / "plain", plain, gradient_accumulation_steps=2, **settings)
    accumulated = run(
        tmp_path / "recipe", recipe, trainer_cls=example.AccumulatorTrainer, max_steps=2 * STEPS, **settings
    )
    history = accumulated["trainer"].accumulator.history
    assert [r.samples for r in history] == [8] * STEPS and not any(r.dropped for r in history)
    assert accumulated["trainer"].state.global_step == 2 * STEPS  # Trainer counts micro-batches
    assert accumulated["order"] == reference["order"]
    difference = relative(accumulated["weights"], reference["weights"])
    print(f"\nFixedPolicy(8) vs gradient_accumulation_steps=2: weights {difference:.2e}")
    assert difference <= 1e-5, f"|w_recipe - w_trainer| / |w_trainer| = {difference:.3e}"


@pytest.mark.parametrize(
    "settings", [{"gradient_accumulation_steps": 2}, {"max_grad_norm": 1.0}], ids=["accumulation", "clip"]
)
def test_accumulator_recipe_refuses_trainers_own_accumulation_and_clipping(tmp_path, settings):
    model = example.tiny_gpt2()
    accumulator = GradientAccumulator(FusedLAMB(model.parameters()), FixedPolicy(8), model=model)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], **settings)
    with pytest.raises(ValueError, match=next(iter(settings))):
        example.AccumulatorTrainer(model=model, args=args, accumulator=accumulator)


def test_accumulator_example_runs(tmp_path, capsys):
    """The example script end to end with tiny settings: the policy chooses the batch sizes."""
    micro_batches, size, max_samples = 24, 4, 32
    history = example.main(
        micro_batches=micro_batches, micro_batch_size=size, max_samples=max_samples, output_dir=str(tmp_path)
    )
    assert history, "the policy never stepped"
    assert all(size <= r.samples <= max_samples and r.samples % size == 0 for r in history)
    assert sum(r.micro_batches for r in history) <= micro_batches
    for r in history:  # the LR rule on top of Trainer's constant schedule
        assert r.lr == pytest.approx(1e-3 * math.sqrt(r.samples / example.BATCH_REF), rel=1e-6)
    out = capsys.readouterr().out
    assert f"{micro_batches} micro-batches of {size} -> {len(history)} optimizer steps" in out
    assert all(f"step {r.step}: {r.samples} samples" in out for r in history)


def test_trainer_builds_fused_lamb_from_optimizer_cls_and_kwargs(tmp_path):
    """``optimizer_cls_and_kwargs=(FusedLAMB, {...})``: Trainer makes the groups (its decay list, its
    ``weight_decay``); for GPT-2 they are the matrices, as ``decay_groups``, so the runs are identical."""
    settings = {"max_steps": 5, "weight_decay": 0.01}

    def given(model):
        return {"optimizers": (FusedLAMB(decay_groups(model), lr=LR), None)}

    def built(model):
        return {"optimizer_cls_and_kwargs": (FusedLAMB, {"lr": LR})}

    reference = run(tmp_path / "given", given, **settings)
    result = run(tmp_path / "built", built, **settings)
    assert isinstance(result["trainer"].optimizer.optimizer, FusedLAMB)
    assert torch.equal(result["weights"], reference["weights"])
