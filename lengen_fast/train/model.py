"""What model does lengen-train train? A minimal decoder-only transformer over packed (flat) token streams.

Every forward takes flat tokens (N,), ``cu_seqlens`` (B+1,) int32 delimiting the attention
segments, and ``positions`` (N,): pre-norm blocks with RMSNorm, lengen_fast.varlen_attention and
lengen_fast.apply_rope (or learned absolute positions, or none), and a GELU or SwiGLU MLP.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import apply_rope, varlen_attention
from .config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.h, self.kv = cfg.n_heads, cfg.n_kv_heads or cfg.n_heads
        self.dh = cfg.d_model // cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, (self.h + 2 * self.kv) * self.dh, bias=False)
        self.proj = nn.Linear(self.h * self.dh, cfg.d_model, bias=False)
        self.rope = cfg.pos_encoding == "rope"
        self.base = cfg.rope_base
        self.dropout = cfg.dropout

    def forward(self, x, cu_seqlens, max_seqlen, positions, rope_scaling, attn_backend):
        N = x.shape[0]
        q, k, v = self.qkv(x).split([self.h * self.dh, self.kv * self.dh, self.kv * self.dh], dim=-1)
        q, k, v = q.view(N, self.h, self.dh), k.view(N, self.kv, self.dh), v.view(N, self.kv, self.dh)
        if self.rope:
            q, k = apply_rope(q, k, position_ids=positions, base=self.base, scaling=rope_scaling)
        y = varlen_attention(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True,
                             backend=attn_backend)                                  # (N, H, Dh)
        return F.dropout(self.proj(y.reshape(N, -1)), self.dropout, self.training)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = cfg.mlp_ratio * cfg.d_model
        self.swiglu = cfg.mlp == "swiglu"
        if self.swiglu:
            hidden = 2 * hidden // 3  # same parameter count as the GELU MLP
        self.up = nn.Linear(cfg.d_model, hidden * (2 if self.swiglu else 1), bias=False)
        self.down = nn.Linear(hidden, cfg.d_model, bias=False)
        self.dropout = cfg.dropout

    def forward(self, x):
        h = self.up(x)
        if self.swiglu:
            a, b = h.chunk(2, dim=-1)
            h = F.silu(a) * b
        else:
            h = F.gelu(h)
        return F.dropout(self.down(h), self.dropout, self.training)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1, self.attn = RMSNorm(cfg.d_model), Attention(cfg)
        self.norm2, self.mlp = RMSNorm(cfg.d_model), MLP(cfg)

    def forward(self, x, *args):
        x = x + self.attn(self.norm1(x), *args)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.cfg, self.vocab_size = cfg, vocab_size
        self.embed = nn.Embedding(vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.max_positions, cfg.d_model) if cfg.pos_encoding == "learned" else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        self.apply(self._init)
        for n, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if n.endswith("proj.weight") or n.endswith("down.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * cfg.n_layers))
        self.attn_backend = None  # None = lengen_fast.backends' default order

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, tokens, cu_seqlens, max_seqlen: int, positions, rope_scaling=None):
        """tokens, positions: (N,) int64; cu_seqlens: (B+1,) int32. Returns logits (N, V).

        ``rope_scaling`` (a lengen_fast.rope.RopeScaling): context extension for this call (evaluation, or
        a fine-tune), passed as an argument so that the model itself never changes."""
        x = self.embed(tokens)                                                      # (N, d)
        if self.pos is not None:
            if int(positions.max()) >= self.pos.num_embeddings:
                raise ValueError(f"position {int(positions.max())} exceeds the learned table "
                                 f"(max_positions={self.pos.num_embeddings})")
            x = x + self.pos(positions)
        x = F.dropout(x, self.cfg.dropout, self.training)
        for blk in self.blocks:
            x = blk(x, cu_seqlens, max_seqlen, positions, rope_scaling, self.attn_backend)
        return self.head(self.norm(x))
