"""A small GPT-style byte-level language model in plain PyTorch, for :mod:`benchmarks.lm_experiment`.

Token and position embeddings, ``layers`` pre-norm transformer blocks (causal self-attention, then a GELU
MLP of 4x the width, each as a residual branch), a final LayerNorm and a linear head over the 256 bytes.
The blocks are named ``layers.<i>.``, the prefix the angle policy's group inference looks for. Linear and
embedding weights start at N(0, 0.02) (the residual outputs scaled down by ``sqrt(2 * layers)``, as in
GPT-2), so the loss at initialisation is close to ``ln 256``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

VOCAB = 256


class Block(nn.Module):
    """``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.fc = nn.Linear(width, 4 * width)
        self.out = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.out(nn.functional.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    """Byte-level causal language model: ``forward(tokens [B, T]) -> logits [B, T, 256]``."""

    def __init__(self, context: int = 64, width: int = 96, layers: int = 4, heads: int = 4):
        super().__init__()
        if width % heads:
            raise ValueError(f"width, heads: expected heads to divide width, got {width}, {heads}")
        self.context = context
        self.tok = nn.Embedding(VOCAB, width)
        self.pos = nn.Embedding(context, width)
        self.layers = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, VOCAB)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("proj.weight", "out.weight")) else 0.02
                nn.init.normal_(p, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.tok(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.layers:
            x = block(x)
        return self.head(self.ln(x))


def lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy (nats) of ``batch [B, T + 1]`` (inputs ``[:, :-1]``, targets shifted)."""
    logits = model(batch[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
