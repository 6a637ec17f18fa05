"""Which other installed kernels can run a varlen attention call, and how are they called so that our guarantees hold?

The peers are torch's FA2 (``torch.nn.attention.varlen.varlen_attn``; called here through the aten ops it wraps,
``aten._flash_attention_forward/backward``, because a custom op's body runs below autograd) and cuDNN's SDPA on
ragged (THD) tensors through the ``nvidia-cudnn-frontend`` Python graph API (package ``cudnn``). Both need
host-side max lengths, so :mod:`lengen_fast.backends` only routes calls that carry ``max_seqlen`` hints to them;
the hints must then bound every document (as in flash-attn; a smaller hint is undefined behaviour on these routes).

Each peer forward/backward has the signature of the ``_FWD`` / ``_BWD`` entries in :mod:`.op` and keeps our
contract whichever kernel ran:
  * out (Tq, H, D) and lse (H, Tq) fp32 natural log in our layout; tokens at/after ``cu_seqlens[-1]`` and rows that
    see no key get out 0 and lse +inf (:func:`dead_rows`), their gradients 0 (:func:`dead_keys` for dk/dv);
  * fwd and bwd may come from different kernels (lse is converted, never a peer's private state);
  * ``deterministic=True`` is honoured (cuDNN: ``use_deterministic_algorithm``; FA2 only when torch's
    deterministic mode is already on, since its flag is global) or the peer declines the call.

:func:`unsupported` names the package or feature that keeps a peer from a call (None when it can run it); the
dispatch and ``backend="fa2"/"cudnn"`` errors use it. The benchmark imports these functions too.
Known traps (shared/DESIGN.md): cudnn-frontend #462 returns all-zero grads when ``max_total_seq_len_q`` is set with
the FA-style LSE layout (not set here: stats stay in cuDNN's padded (B, H, S, 1) layout and are converted);
torch 2.11's ``aten._cudnn_attention_backward`` reads out of bounds on varlen (not used: graphs are built directly).
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
from typing import Optional

import torch

PEERS = ("fa2", "cudnn")
PACKAGE = {"fa2": "torch >= 2.10 built with flash attention (torch.nn.attention.varlen.varlen_attn)",
           "cudnn": "nvidia-cudnn-frontend (import cudnn) and a torch built with cuDNN"}


# ================================================================================================ availability

@functools.lru_cache(maxsize=None)
def missing(name: str) -> Optional[str]:
    """Why peer ``name`` cannot run in this process at all (package, build, device), or None."""
    if name not in PEERS:
        return f"unknown peer {name!r} (peers: {PEERS})"
    if not torch.cuda.is_available():
        return "no CUDA device (the peers run on CUDA only)"
    if name == "fa2":
        if importlib.util.find_spec("torch.nn.attention.varlen") is None or \
                not hasattr(importlib.import_module("torch.nn.attention.varlen"), "varlen_attn"):
            return f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn (needs torch >= 2.10)"
        if not torch.backends.cuda.is_flash_attention_available():
            return f"torch {torch.__version__} was built without flash attention"
        return None
    if importlib.util.find_spec("cudnn") is None:
        return "package nvidia-cudnn-frontend is not installed (import cudnn failed)"
    if not torch.backends.cudnn.is_available():
        return f"torch {torch.__version__} was built without cuDNN"
    try:
        importlib.import_module("cudnn")
    except Exception as e:                                   # a broken install names itself
        return f"import cudnn failed: {type(e).__name__}: {e}"
    return None


def unsupported(name: str, call, pass_: Optional[str] = None) -> Optional[str]:
    """The feature of ``call`` (a :class:`lengen_fast.backends.AttentionCall`) that peer ``name`` cannot run in pass
    ``pass_`` ("fwd", "bwd", or None for both), or None. Availability (:func:`missing`) is checked separately."""
    from .. import backends
    if call.device.type not in backends.PEER_DEVICES:
        return f"a {call.device.type} tensor (the peers run on CUDA only)"
    if call.max_seqlen_q is None or call.max_seqlen_k is None:
        return "a call without max_seqlen_q/max_seqlen_k hints (the peers need host-side max lengths)"
    if call.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {call.dtype} (fp16/bf16 only)"
    if call.softcap > 0:
        return "softcap"
    if call.head_dim % 8 or call.head_dim > 256:
        return f"head_dim {call.head_dim} (a multiple of 8 up to 256)"
    if name == "fa2":
        if pass_ != "fwd" and call.deterministic and not (torch.are_deterministic_algorithms_enabled()
                                       and not torch.is_deterministic_algorithms_warn_only_enabled()):
            return ("deterministic=True (FA2's deterministic backward follows torch.use_deterministic_algorithms, "
                    "which is off)")
        return None
    if name == "cudnn":
        if call.mask_kind not in ("causal", "full"):
            return f"mask {call.mask_kind!r} (cuDNN route: causal or full attention, no window)"
        if call.head_dim > 128 and torch.cuda.get_device_capability(call.device)[0] < 9:
            return f"head_dim {call.head_dim} before sm_90"
        return None
    return f"unknown peer {name!r}"


# ================================================================================================ our guarantees

def _doc_of(cu: torch.Tensor, T: int):
    """Per token of a (T,) packed side: (doc index clamped to [0, B-1], position in it, tail mask), device-side."""
    B = cu.numel() - 1
    t = torch.arange(T, device=cu.device, dtype=torch.int32)
    doc = torch.searchsorted(cu, t, right=True) - 1                  # B for tokens at/after cu[-1]
    tail = doc >= B
    doc = doc.clamp(0, max(B - 1, 0))
    pos = t - cu[doc] if B > 0 else t
    return doc, pos, tail


def dead_rows(cu_q, cu_k, Tq: int, left: int, right: int) -> torch.Tensor:
    """(Tq,) bool: query rows that must output 0 with lse +inf: tail tokens and rows that see no key
    (row i of a document sees keys i + d - left ..= i + d + right, d = s_k - s_q, -1 = unbounded). No host sync."""
    doc, i, tail = _doc_of(cu_q, Tq)
    if cu_q.numel() == 1:
        return tail
    sq = (cu_q[1:] - cu_q[:-1])[doc]
    sk = (cu_k[1:] - cu_k[:-1])[doc]
    r = i + sk - sq
    lo = (r - left).clamp(min=0) if left >= 0 else torch.zeros_like(r)
    hi = torch.minimum(r + right, sk - 1) if right >= 0 else sk - 1
    return tail | (lo > hi)


def dead_keys(cu_q, cu_k, Tk: int, left: int, right: int) -> torch.Tensor:
    """(Tk,) bool: keys no query sees (tail tokens, documents without queries, keys outside every window)."""
    # key j is seen by rows j - d - right ..= j - d + left: the row question with the sides swapped and d negated
    return dead_rows(cu_k, cu_q, Tk, right, left)


def finish_fwd(out, lse, cu_q, cu_k, left: int, right: int):
    """Our contract on a peer's forward: dead rows -> out 0, lse +inf (a peer may leave them uninitialised)."""
    bad = dead_rows(cu_q, cu_k, out.shape[0], left, right)
    out.masked_fill_(bad[:, None, None], 0)
    lse.masked_fill_(bad[None, :], float("inf"))
    return out, lse


def finish_bwd(dq, dk, dv, cu_q, cu_k, left: int, right: int):
    bad_q = dead_rows(cu_q, cu_k, dq.shape[0], left, right)
    bad_k = dead_keys(cu_q, cu_k, dk.shape[0], left, right)
    dq.masked_fill_(bad_q[:, None, None], 0)
    dk.masked_fill_(bad_k[:, None, None], 0)
    dv.masked_fill_(bad_k[:, None, None], 0)
    return dq, dk, dv


def _last_dim_dense(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _hint(m: Optional[int]) -> int:
    if m is None:
        raise ValueError("the peer routes need max_seqlen_q and max_seqlen_k hints")
    return max(int(m), 1)


# ================================================================================================ FA2 (torch)

def fa2_fwd_kernel(q, k, v, cu_q, cu_k, max_q: int, max_k: int, causal: bool, scale: float, left: int, right: int):
    """The raw FA2 forward (aten._flash_attention_forward, varlen): (out (Tq, H, D), lse (H, Tq) natural log).
    Dead rows are whatever the kernel left there."""
    out, lse = torch.ops.aten._flash_attention_forward(
        q, k, v, cu_q, cu_k, max_q, max_k, 0.0, causal, False, scale=scale,
        window_size_left=left, window_size_right=right)[:2]
    return out, lse


def fa2_bwd_kernel(dout, q, k, v, out, lse, cu_q, cu_k, max_q: int, max_k: int, causal: bool, scale: float,
                   left: int, right: int):
    # dropout is 0, so the philox state is unused (torch's own varlen backward passes these placeholders)
    rng = torch.zeros(2, dtype=torch.uint64, device=q.device)
    unused = torch.empty(0, device=q.device)
    return torch.ops.aten._flash_attention_backward(
        dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, 0.0, causal, rng, unused, scale=scale,
        window_size_left=left, window_size_right=right)


def fwd_fa2(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, left, right, softcap):
    right = 0 if causal else int(right)
    q, k, v = (_last_dim_dense(x) for x in (q, k, v))
    out, lse = fa2_fwd_kernel(q, k, v, cu_q, cu_k, _hint(max_q), _hint(max_k), bool(causal), float(scale), int(left),
                              right)
    if tuple(lse.shape) != (q.shape[1], q.shape[0]):
        raise RuntimeError(f"torch {torch.__version__}'s FA2 returned lse of shape {tuple(lse.shape)}, not the "
                           f"unpadded (H, total_q) = {(q.shape[1], q.shape[0])} this wrapper expects")
    return finish_fwd(out, lse.contiguous(), cu_q, cu_k, left, right)


def bwd_fa2(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale, left, right, softcap, deterministic):
    right = 0 if causal else int(right)
    q, k, v, out, dout = (_last_dim_dense(x) for x in (q, k, v, out, dout))
    dq, dk, dv = fa2_bwd_kernel(dout, q, k, v, out, lse.contiguous(), cu_q, cu_k, _hint(max_q), _hint(max_k),
                                bool(causal), float(scale), int(left), right)
    return finish_bwd(dq, dk, dv, cu_q, cu_k, left, right)


# ================================================================================================ cuDNN

_HANDLES: dict = {}
_GRAPHS: dict = {}


def _cudnn():
    return importlib.import_module("cudnn")


def _handle(device: torch.device):
    cudnn = _cudnn()
    idx = device.index if device.index is not None else torch.cuda.current_device()
    h = _HANDLES.get(idx)
    if h is None:
        with torch.cuda.device(idx):
            h = _HANDLES[idx] = cudnn.create_handle()
    cudnn.set_stream(handle=h, stream=torch.cuda.current_stream(device).cuda_stream)
    return h


def _bucket(n: int, lo: int) -> int:
    """Graphs are built per (batch, max length) bucket: powers of two, so a training run builds a few graphs."""
    return max(lo, 1 << (max(n, 1) - 1).bit_length())


class _Ragged:
    """One call's ragged description: padded batch Bp (extra documents have length 0), max lengths Sq/Sk, per-doc
    lengths (Bp, 1, 1, 1) int32 and element offsets per token stride."""

    def __init__(self, cu_q, cu_k, max_q, max_k):
        B = cu_q.numel() - 1
        self.B, self.Bp = B, _bucket(B, 1)
        self.Sq, self.Sk = _bucket(_hint(max_q), 64), _bucket(_hint(max_k), 64)
        pad = self.Bp - B
        self.cu_q = torch.cat([cu_q, cu_q[-1:].expand(pad)]) if pad else cu_q          # (Bp+1,)
        self.cu_k = torch.cat([cu_k, cu_k[-1:].expand(pad)]) if pad else cu_k
        self.len_q = (self.cu_q[1:] - self.cu_q[:-1]).view(-1, 1, 1, 1).int()
        self.len_k = (self.cu_k[1:] - self.cu_k[:-1]).view(-1, 1, 1, 1).int()
        self._off: dict = {}

    def offsets(self, side: str, stride_t: int) -> torch.Tensor:
        key = (side, stride_t)
        if key not in self._off:
            cu = self.cu_q if side == "q" else self.cu_k
            self._off[key] = (cu.to(torch.int64) * stride_t).to(torch.int32).view(-1, 1, 1, 1)
        return self._off[key]


def _dims(x, S, Bp):
    """cuDNN (b, h, s, d) dims and strides of a (T, H, D) tensor with unit stride along D."""
    T, H, D = x.shape
    return [Bp, H, S, D], [S * x.stride(0), x.stride(1), x.stride(0), 1]


def _io_type(dtype):
    cudnn = _cudnn()
    return cudnn.data_type.BFLOAT16 if dtype == torch.bfloat16 else cudnn.data_type.HALF


def _mask_args(causal: bool):
    cudnn = _cudnn()
    if causal:
        return dict(diagonal_alignment=cudnn.diagonal_alignment.BOTTOM_RIGHT, diagonal_band_right_bound=0)
    return {}


def _graph(key, build):
    g = _GRAPHS.get(key)
    if g is None:
        g = _GRAPHS[key] = build()
    return g


def _build(g):
    cudnn = _cudnn()
    g.validate()
    g.build_operation_graph()
    g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    g.check_support()
    g.build_plans()
    return g


def _check_int32(*xs):
    """Ragged offsets are int32 element offsets."""
    for x in xs:
        if x.shape[0] * x.stride(0) >= 2 ** 31:
            raise ValueError("cuDNN route: tensors of 2^31 or more elements need int64 ragged offsets (not supported)")


def _offset_tensor(g, name, r: _Ragged):
    cudnn = _cudnn()
    return g.tensor(name=name, dim=[r.Bp + 1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=cudnn.data_type.INT32)


def _tensor(g, name, x, S, r: _Ragged):
    """A ragged (b, h, s, d) graph input of the (T, H, D) tensor x, and its offsets' graph tensor."""
    dim, stride = _dims(x, S, r.Bp)
    t = g.tensor(name=name, dim=dim, stride=stride, data_type=_io_type(x.dtype))
    off = _offset_tensor(g, name + "_off", r)
    t.set_ragged_offset(off)
    return t, off


def _output(g, name, t, x, S, r: _Ragged):
    """Mark graph output t as the ragged (T, H, D) tensor x."""
    dim, stride = _dims(x, S, r.Bp)
    off = _offset_tensor(g, name + "_off", r)
    t.set_output(True).set_dim(dim).set_stride(stride).set_ragged_offset(off)
    return t, off


def _lengths(g, r: _Ragged):
    cudnn = _cudnn()
    return tuple(g.tensor(name=n, dim=[r.Bp, 1, 1, 1], stride=[1, 1, 1, 1], data_type=cudnn.data_type.INT32)
                 for n in ("len_q", "len_k"))


def cudnn_fwd_kernel(q, k, v, r: "_Ragged", causal: bool, scale: float):
    """The raw cuDNN forward on ragged tensors: (out (Tq, H, D), stats (Bp, H, Sq, 1) fp32 natural-log lse, padded)."""
    cudnn = _cudnn()
    Tq, H, D = q.shape
    out = torch.empty((Tq, H, D), dtype=q.dtype, device=q.device)
    stats = torch.empty((r.Bp, H, r.Sq, 1), dtype=torch.float32, device=q.device)
    key = ("fwd", q.device, q.dtype, r.Bp, r.Sq, r.Sk, H, k.shape[1], D, q.stride()[:2], k.stride()[:2],
           v.stride()[:2], causal, scale)
    handle = _handle(q.device)

    def build():
        g = cudnn.pygraph(io_data_type=_io_type(q.dtype), intermediate_data_type=cudnn.data_type.FLOAT,
                          compute_data_type=cudnn.data_type.FLOAT, handle=handle)
        t = {}
        for name, x, S in (("q", q, r.Sq), ("k", k, r.Sk), ("v", v, r.Sk)):
            t[name], t[name + "_off"] = _tensor(g, name, x, S, r)
        t["lq"], t["lk"] = _lengths(g, r)
        o, st = g.sdpa(name="sdpa", q=t["q"], k=t["k"], v=t["v"], generate_stats=True, attn_scale=scale,
                       use_padding_mask=True, seq_len_q=t["lq"], seq_len_kv=t["lk"], **_mask_args(causal))
        t["o"], t["o_off"] = _output(g, "o", o, out, r.Sq, r)
        st.set_output(True).set_data_type(cudnn.data_type.FLOAT)
        t["st"] = st
        return _build(g), t

    g, t = _graph(key, build)
    pack = {t["lq"]: r.len_q, t["lk"]: r.len_k, t["st"]: stats}
    for name, x, side in (("q", q, "q"), ("k", k, "k"), ("v", v, "k"), ("o", out, "q")):
        pack[t[name]] = x
        pack[t[name + "_off"]] = r.offsets(side, x.stride(0))
    g.execute(pack, torch.empty(g.get_workspace_size(), device=q.device, dtype=torch.uint8), handle=handle)
    return out, stats


def cudnn_bwd_kernel(dout, q, k, v, out, stats, r: "_Ragged", causal: bool, scale: float, deterministic: bool):
    """The raw cuDNN backward: (dq, dk, dv) from cuDNN's padded stats (Bp, H, Sq, 1)."""
    cudnn = _cudnn()
    H, Hkv, D = q.shape[1], k.shape[1], q.shape[2]
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    key = ("bwd", q.device, q.dtype, r.Bp, r.Sq, r.Sk, H, Hkv, D, q.stride()[:2], k.stride()[:2], v.stride()[:2],
           out.stride()[:2], dout.stride()[:2], causal, scale, deterministic)
    handle = _handle(q.device)

    def build():
        g = cudnn.pygraph(io_data_type=_io_type(q.dtype), intermediate_data_type=cudnn.data_type.FLOAT,
                          compute_data_type=cudnn.data_type.FLOAT, handle=handle)
        t = {}
        for name, x, S in (("q", q, r.Sq), ("k", k, r.Sk), ("v", v, r.Sk), ("o", out, r.Sq), ("do", dout, r.Sq)):
            t[name], t[name + "_off"] = _tensor(g, name, x, S, r)
        t["st"] = g.tensor(name="stats", dim=[r.Bp, H, r.Sq, 1], stride=[H * r.Sq, r.Sq, 1, 1],
                           data_type=cudnn.data_type.FLOAT)
        t["lq"], t["lk"] = _lengths(g, r)
        # no max_total_seq_len_q/kv: cudnn-frontend #462 (all-zero gradients with it)
        gq, gk, gv = g.sdpa_backward(name="sdpa_bwd", q=t["q"], k=t["k"], v=t["v"], o=t["o"], dO=t["do"],
                                     stats=t["st"], attn_scale=scale, use_padding_mask=True,
                                     seq_len_q=t["lq"], seq_len_kv=t["lk"],
                                     use_deterministic_algorithm=deterministic, **_mask_args(causal))
        for name, gt, x, S in (("dq", gq, dq, r.Sq), ("dk", gk, dk, r.Sk), ("dv", gv, dv, r.Sk)):
            t[name], t[name + "_off"] = _output(g, name, gt, x, S, r)
        return _build(g), t

    g, t = _graph(key, build)
    pack = {t["st"]: stats, t["lq"]: r.len_q, t["lk"]: r.len_k}
    for name, x, side in (("q", q, "q"), ("k", k, "k"), ("v", v, "k"), ("o", out, "q"), ("do", dout, "q"),
                          ("dq", dq, "q"), ("dk", dk, "k"), ("dv", dv, "k")):
        pack[t[name]] = x
        pack[t[name + "_off"]] = r.offsets(side, x.stride(0))
    g.execute(pack, torch.empty(g.get_workspace_size(), device=q.device, dtype=torch.uint8), handle=handle)
    return dq, dk, dv


def lse_from_stats(stats, cu_q, Tq: int):
    """cuDNN's padded (Bp, H, Sq, 1) stats -> our (H, Tq) lse (dead rows are fixed by finish_fwd)."""
    doc, pos, _ = _doc_of(cu_q, Tq)
    return stats[doc.long(), :, pos.clamp(0, stats.shape[2] - 1).long(), 0].t().contiguous()


def stats_from_lse(lse, cu_q, r: "_Ragged"):
    """Our (H, Tq) lse -> cuDNN's padded (Bp, H, Sq, 1) stats; tail tokens go to a scratch document, padding is 0."""
    H, Tq = lse.shape
    stats = torch.zeros((r.Bp + 1, H, r.Sq, 1), dtype=torch.float32, device=lse.device)
    doc, pos, tail = _doc_of(cu_q, Tq)
    doc = torch.where(tail, r.Bp, doc).long()
    pos = torch.where(tail, 0, pos).clamp(0, r.Sq - 1).long()
    stats[doc, :, pos, 0] = lse.t()
    return stats[:r.Bp]


def fwd_cudnn(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, left, right, softcap):
    q, k, v = (_last_dim_dense(x) for x in (q, k, v))
    _check_int32(q, k, v)
    r = _Ragged(cu_q, cu_k, max_q, max_k)
    out, stats = cudnn_fwd_kernel(q, k, v, r, bool(causal), float(scale))
    lse = lse_from_stats(stats, cu_q, q.shape[0])
    return finish_fwd(out, lse, cu_q, cu_k, left, 0 if causal else right)


def bwd_cudnn(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale, left, right, softcap,
              deterministic):
    q, k, v, out, dout = (_last_dim_dense(x) for x in (q, k, v, out, dout))
    _check_int32(q, k, v, out, dout)
    r = _Ragged(cu_q, cu_k, max_q, max_k)
    dq, dk, dv = cudnn_bwd_kernel(dout, q, k, v, out, stats_from_lse(lse, cu_q, r), r, bool(causal), float(scale),
                                  bool(deterministic))
    return finish_bwd(dq, dk, dv, cu_q, cu_k, left, 0 if causal else right)


FWD = {"fa2": fwd_fa2, "cudnn": fwd_cudnn}
BWD = {"fa2": bwd_fa2, "cudnn": bwd_cudnn}
