"""What model does lengen-train train? A minimal decoder-only transformer over packed (flat) token streams.

Every forward takes flat tokens (N,), ``cu_seqlens`` (B+1,) int32 delimiting the attention
segments, and ``positions`` (N,): pre-norm blocks with RMSNorm, lengen_fast.varlen_attention and
lengen_fast.apply_rope (or learned absolute positions, or none), and a GELU or SwiGLU MLP.
With ``labels`` the forward returns the summed next-token loss from :func:`chunked_cross_entropy`,
so the (N, V) logits are never held whole.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import apply_rope, varlen_attention
from .config import ModelConfig



class _ChunkedCE(torch.autograd.Function):
    """Sum of cross-entropy over rows of logits = hidden @ weight.T, ``chunk`` rows at a time.

    The forward computes each chunk's loss and its gradients (softmax - onehot) at once and keeps
    only d hidden (N, d) and d weight (V, d): peak extra memory is one (chunk, V) block instead of
    the (N, V) logits plus their gradient. The backward scales the stored gradients.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk: int, ignore_index: int):
        N = hidden.shape[0]
        needs = ctx.needs_input_grad
        acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32 reductions (fp64 stays fp64)
        gh = torch.zeros_like(hidden) if needs[0] else None                          # (N, d)
        gw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if needs[1] else None
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for a in range(0, N, chunk):
            h, y = hidden[a:a + chunk], labels[a:a + chunk]
            logits = (h @ weight.t()).to(acc)                                         # (c, V)
            valid = y != ignore_index
            yv = torch.where(valid, y, torch.zeros_like(y))
            lse = torch.logsumexp(logits, dim=-1)                                     # (c,)
            tgt = logits.gather(1, yv[:, None]).squeeze(1)
            total = total + ((lse - tgt) * valid).sum()
            if gh is not None or gw is not None:
                g = torch.softmax(logits, dim=-1)                                     # d loss / d logits
                g[torch.arange(g.shape[0], device=g.device), yv] -= 1.0
                g = g * valid[:, None]
                if gh is not None:
                    gh[a:a + chunk] = (g.to(weight.dtype) @ weight).to(gh.dtype)
                if gw is not None:
                    gw += g.t() @ h.to(acc)
        ctx.save_for_backward(gh, gw)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        gh, gw = ctx.saved_tensors
        dh = gh * grad_out.to(gh.dtype) if gh is not None else None
        dw = (gw * grad_out).to(ctx.weight_dtype) if gw is not None else None
        return dh, dw, None, None, None


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, chunk: int = 4096,
                          ignore_index: int = -100, reduction: str = "sum") -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T`` against ``labels`` without the whole (N, V) logits.

    hidden (N, d), weight (V, d), labels (N,) int64 (``ignore_index`` rows count nothing).
    reduction: "sum" (differentiable, the usual training path), "mean" (over labelled rows), or
    "none" (per-row (N,) losses, 0 at ignored rows; computed without autograd).
    Logits are formed in the inputs' dtype (bf16 under autocast callers) and reduced in fp32.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"chunked_cross_entropy: hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} "
                         "must be (N, d) and (V, d)")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"chunked_cross_entropy: labels {tuple(labels.shape)} must be ({hidden.shape[0]},)")
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunked_cross_entropy: chunk must be a positive int, got {chunk!r}")
    if hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)
    if reduction == "none":
        acc = torch.promote_types(hidden.dtype, torch.float32)
        out = torch.zeros(hidden.shape[0], dtype=acc, device=hidden.device)
        with torch.no_grad():
            for a in range(0, hidden.shape[0], chunk):
                logits = (hidden[a:a + chunk] @ weight.t()).to(acc)
                out[a:a + chunk] = F.cross_entropy(logits, labels[a:a + chunk], ignore_index=ignore_index,
                                                   reduction="none")
        return out
    total = _ChunkedCE.apply(hidden, weight, labels, chunk, ignore_index)
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / (labels != ignore_index).sum().clamp(min=1)
    raise ValueError(f"chunked_cross_entropy: reduction must be sum, mean or none, got {reduction!r}")


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

    def forward(self, tokens, cu_seqlens, max_seqlen: int, positions, rope_scaling=None, *, labels=None,
                loss_chunk: int = 4096, reduction: str = "sum"):
        """tokens, positions: (N,) int64; cu_seqlens: (B+1,) int32. Returns logits (N, V), or with
        ``labels`` (N,) the chunked next-token loss (see chunked_cross_entropy; "sum" by default), so the
        (N, V) logits are never held whole.

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
        if labels is not None:
            return chunked_cross_entropy(self.norm(x), self.head.weight, labels, chunk=loss_chunk,
                                         reduction=reduction)
        return self.head(self.norm(x))


def build_model(plan) -> nn.Module:
    """The model a run trains: our Transformer (model.arch "lengen"), or a Hugging Face architecture
    ("hf:PATH", a config.json or checkpoint directory) behind an adapter with this module's forward signature."""
    m = plan.cfg.model
    if m.arch.startswith("hf:"):
        from ..integrations.hf.engine_model import load_hf_model
        model = load_hf_model(m.arch[3:])       # its own random initialization (torch.manual_seed(seed) before)
        if model.vocab_size < plan.vocab:
            raise ValueError(f"model.arch={m.arch!r}: its vocabulary ({model.vocab_size}) is smaller than the "
                             f"workload's ({plan.vocab} token ids)")
        return model
    return Transformer(m, plan.vocab)
