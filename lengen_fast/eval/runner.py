"""How is a model run over documents under one scaling arm, within --max-tokens tokens per forward?

Documents are packed in order into forwards of at most ``max_tokens`` tokens (flat tokens, cu_seqlens, positions
restarting per document): with the varlen attention no (S, S) mask exists and no document sees another. For an
arm whose frequencies depend on the sequence length (dynamic NTK) only documents of equal length share a forward,
so each is rotated as transformers rotates it alone (seq_len = its own length).

Memory: before the first forward, an estimate of one forward's peak (activations of ``max_tokens`` tokens plus the
logits the loss forms ``loss_chunk`` rows at a time, or all of them for our models) is compared with the memory
free on the device; a forward that still fails to allocate is caught. Both end in an EvalError naming --max-tokens.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .config import EvalError


def groups(lengths: list[int], max_tokens: int, per_length: bool) -> list[list[int]]:
    """Consecutive runs of document indices whose lengths sum to <= max_tokens (equal lengths only if per_length)."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i)) if per_length else list(range(len(lengths)))
    out, cur, used = [], [], 0
    for i in order:
        n = lengths[i]
        if cur and (used + n > max_tokens or (per_length and n != lengths[cur[0]])):
            out.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += n
    if cur:
        out.append(cur)
    return out


def _layout(docs: list[np.ndarray], device):
    """Flat tokens (N,), cu_seqlens (B+1,) int32, positions (N,), next-token labels (N,) (-100 at each doc's end)."""
    lens = [d.size for d in docs]
    tokens = torch.from_numpy(np.concatenate(docs)).to(device)
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lens)]), dtype=torch.int32, device=device)
    pos = torch.cat([torch.arange(n) for n in lens]).to(device)
    labels = torch.cat([torch.cat([torch.from_numpy(d[1:]), torch.tensor([-100])]) for d in docs]).to(device)
    return tokens, cu, pos, labels, max(lens)


def available_bytes(device: torch.device) -> int | None:
    """Free memory on ``device`` (CUDA: mem_get_info; CPU: MemAvailable of /proc/meminfo); None when unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def estimate_bytes(shape: dict, n_tokens: int, elt: int, loss_chunk: int) -> int:
    """Peak extra bytes of one no-grad forward of ``n_tokens`` tokens: the residual stream and its norms, q/k/v and
    the attention output (~10 x d_model per token, a few alive at once), the MLP's up projection and activation
    (~3 x d_ff), and the fp32 logits with their softmax (2 x vocab per row) for every row (our models) or for
    ``loss_chunk`` rows (HF models, whose loss is chunked)."""
    act = n_tokens * elt * (10 * shape["d_model"] + 3 * shape["d_ff"])
    rows = n_tokens if shape.get("logits") else min(n_tokens, loss_chunk)
    return int(act + rows * shape["vocab_size"] * 4 * 2)


def check_memory(shape: dict, max_tokens: int, longest: int, dtype: torch.dtype, device: torch.device,
                 loss_chunk: int) -> None:
    if max_tokens < longest:
        raise EvalError(f"--max-tokens {max_tokens} is smaller than the longest evaluated sequence ({longest} tokens "
                        f"= the largest --multiples x L); a document cannot be split across forwards: raise "
                        "--max-tokens or lower --multiples")
    need = estimate_bytes(shape, max_tokens, torch.finfo(dtype).bits // 8, loss_chunk)
    free = available_bytes(device)
    if free is not None and need > 0.9 * free:
        raise EvalError(f"--max-tokens {max_tokens}: one forward needs about {need / 2**30:.2f} GiB (estimated) but "
                        f"only {free / 2**30:.2f} GiB is free on {device}; lower --max-tokens (to >= {longest}, the "
                        "longest sequence; lower --multiples if that does not fit either)")


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        return True
    msg = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg
                                            or "not enough memory" in msg)


class _Guard:
    """Turns an allocation failure inside the block into an EvalError naming --max-tokens."""

    def __init__(self, n_tokens: int, device):
        self.n, self.device = n_tokens, device

    def __enter__(self):
        return self

    def __exit__(self, et, e, tb):
        if e is not None and _is_oom(e):
            raise EvalError(f"--max-tokens: a forward of {self.n} tokens ran out of memory on {self.device} "
                            f"({type(e).__name__}: {str(e)[:200]}); lower --max-tokens") from e
        return False


@torch.no_grad()
def token_losses(model, docs: list[np.ndarray], arm, *, max_tokens: int, device, loss_chunk: int,
                 bar=None) -> list[np.ndarray]:
    """Per document, the next-token loss at each position t (predicting token t + 1): (len - 1,) float64."""
    out: list[np.ndarray | None] = [None] * len(docs)
    for g in groups([d.size for d in docs], max_tokens, arm.per_length):
        tokens, cu, pos, labels, longest = _layout([docs[i] for i in g], device)
        with _Guard(tokens.numel(), device):
            loss = model(tokens, cu, longest, pos, arm.scaling, labels=labels, loss_chunk=loss_chunk,
                         reduction="none")
        loss = loss.double().cpu().numpy()
        for j, i in enumerate(g):
            a, b = int(cu[j]), int(cu[j + 1])
            out[i] = loss[a:b - 1]
        if bar is not None:
            bar.update(tokens.numel())
    return out


@torch.no_grad()
def passkey_scores(model, prompts, arm, *, max_tokens: int, device, bar=None) -> list[dict]:
    """Per prompt: {"correct": greedy reproduces the key, "nll": the key's summed negative log-likelihood}."""
    out: list[dict | None] = [None] * len(prompts)
    for g in groups([p.tokens.size for p in prompts], max_tokens, arm.per_length):
        tokens, cu, pos, _, longest = _layout([prompts[i].tokens for i in g], device)
        index = torch.cat([torch.arange(int(cu[j]) + prompts[i].answer_start - 1,
                                        int(cu[j]) + prompts[i].answer_start - 1 + prompts[i].answer_len)
                           for j, i in enumerate(g)]).to(device)
        with _Guard(tokens.numel(), device):
            logits = model.logits_at(tokens, cu, longest, pos, index, arm.scaling).float()   # (answer tokens, V)
        targets = tokens[index + 1]
        logp = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None])[:, 0]
        hit = (logits.argmax(-1) == targets).cpu().numpy()
        logp = logp.double().cpu().numpy()
        k = 0
        for i in g:
            n = prompts[i].answer_len
            out[i] = {"correct": bool(hit[k:k + n].all()), "nll": float(-logp[k:k + n].sum())}
            k += n
        if bar is not None:
            bar.update(tokens.numel())
    return out


def bucket_means(losses: list[np.ndarray], edges: list[int]) -> list[list[float]]:
    """[doc][bucket] mean loss over positions [edges[i], edges[i+1]) the document reaches; NaN where it does not."""
    out = []
    for x in losses:
        row = []
        for a, b in zip(edges[:-1], edges[1:]):
            seg = x[a:b]
            row.append(float(seg.mean()) if seg.size else math.nan)
        out.append(row)
    return out
