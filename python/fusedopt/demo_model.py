"""A small GPT for the demo: pre-LayerNorm blocks, causal self-attention, GELU MLP.

Linear layers have no bias (as in nanoGPT's bias=False): every linear weight inside a block then
feeds a LayerNorm through the residual stream, which is the "normalized layer" setting of
Defazio 2025 (arXiv 2506.02285), and the decay groups stay simple (see `param_groups`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class GPTConfig:
    vocab_size: int
    context: int = 64
    n_layer: int = 2
    n_head: int = 4
    d_model: int = 64


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.attn_out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model, bias=False)
        self.fc_out = nn.Linear(4 * cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_out(y.transpose(1, 2).reshape(b, t, d))
        return x + self.fc_out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        if cfg.d_model % cfg.n_head:
            raise ValueError(f"d_model={cfg.d_model} must be divisible by n_head={cfg.n_head}")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.context, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init)
        # GPT-2's scaled init of the projections that write into the residual stream.
        for block in self.blocks:
            for proj in (block.attn_out, block.fc_out):
                nn.init.normal_(proj.weight, std=0.02 / (2 * cfg.n_layer) ** 0.5)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(pos)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def param_groups(model: GPT, weight_decay: float) -> list[dict]:
    """Two named param groups, following Defazio's setup.

    normalized: the linear weights inside the blocks (qkv, attn_out, fc, fc_out). Their output
        reaches a LayerNorm, so their scale is (nearly) free and weight decay sets it; this group
        gets weight decay, and under AdamC the schedule correction.
    other: embeddings, LayerNorm gains and biases, and the output head: no weight decay. The
        head's output is not normalized and norms/biases are not weights of normalized layers, so
        the steady-state argument does not apply to them; keeping them undecayed means the two
        runs differ only in the group the paper is about.
    """
    normalized, other = [], []
    for name, p in model.named_parameters():
        is_block_linear = name.startswith("blocks.") and p.ndim == 2
        (normalized if is_block_linear else other).append((name, p))
    return [
        {"params": normalized, "weight_decay": weight_decay},
        {"params": other, "weight_decay": 0.0},
    ]
