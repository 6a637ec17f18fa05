"""Multi-process data parallelism for lengen-train on torch.distributed (torchrun or ``--nproc N``).

Design, so that a W-process run with ``tokens_per_batch`` T reproduces the 1-process run with T:
- ``tokens_per_batch`` is global: each rank's PackedLoader (rank, world_size) takes its own 1/W
  slice of every global batch. The plan (bucket per step, epoch permutations) comes from the seed,
  so every rank has the same sequence length at each step, the documents are disjoint, and no
  communication is needed for data.
- The loss is a token-weighted mean over the union of all ranks' label tokens: each rank
  backpropagates ``sum(local CE) * W / N_global`` and DDP/FSDP average the gradients (divide by W),
  giving ``sum(CE) / N_global``: the same gradient as one process with the whole batch.
- Evaluation is sharded: uniform-layout forwards (B same-length documents) are split over the
  ranks and the logits are all-gathered, so every rank computes identical metrics and makes the
  same early-stopping decisions.
- Only rank 0 writes checkpoints and reports; the checkpoint holds every rank's RNG streams and the
  world size, and a resume under a different world size is refused (the data order and the RNG
  streams depend on it, so exact continuation is impossible).
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn

DIST_BACKENDS = ("auto", "gloo", "nccl")   # process-group backends (not lengen_fast.backends' op backends)
PARALLEL = ("ddp", "fsdp")
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def has_fsdp2() -> bool:
    """FSDP2 (``torch.distributed.fsdp.fully_shard``) is public from torch 2.6."""
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(name: str, cuda_available: bool | None = None) -> str:
    """"auto" -> nccl on CUDA machines, gloo otherwise; a clear error when ``name`` cannot run here."""
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    if name not in DIST_BACKENDS:
        raise ValueError(f"dist_backend must be one of {DIST_BACKENDS}, got {name!r}")
    if name == "auto":
        name = "nccl" if cuda and dist.is_nccl_available() else "gloo"
    if name == "nccl" and not cuda:
        raise ValueError("dist_backend 'nccl' is unavailable on this device: CUDA is not available "
                         "(nccl needs one GPU per process); use --dist-backend gloo on CPU")
    if name == "nccl" and not dist.is_nccl_available():
        raise ValueError("dist_backend 'nccl' is unavailable: this torch build has no NCCL support")
    if name == "gloo" and not dist.is_gloo_available():
        raise ValueError("dist_backend 'gloo' is unavailable: this torch build has no Gloo support")
    return name


def check_parallel(parallel: str, world_size: int) -> None:
    if parallel not in PARALLEL:
        raise ValueError(f"parallel must be one of {PARALLEL}, got {parallel!r}")
    if parallel == "fsdp" and world_size > 1 and not has_fsdp2():
        raise ValueError(f"parallel 'fsdp' needs FSDP2 (torch.distributed.fsdp.fully_shard, torch >= 2.6); "
                         f"this is torch {torch.__version__}: use --parallel ddp")


def check_world_size(tokens_per_batch: int, seq_lens, world_size: int) -> None:
    """Every global batch of ``tokens_per_batch // seq_len`` rows must split evenly over the ranks."""
    if world_size < 1:
        raise ValueError(f"world size must be >= 1, got {world_size}")
    for s in sorted(set(int(x) for x in seq_lens)):
        rows = tokens_per_batch // s
        if rows % world_size:
            raise ValueError(f"world size {world_size} does not divide tokens_per_batch / seq_len = "
                             f"{tokens_per_batch} / {s} = {rows} rows per step: every rank needs the same number "
                             f"of rows; use a tokens_per_batch that is a multiple of {world_size * s}")


def check_resume_world(ck: dict, world_size: int, path) -> None:
    saved = int(ck.get("world_size", 1))
    if saved != world_size:
        raise ValueError(
            f"cannot resume from {path}: it was written by a run with world size {saved}, this run has world "
            f"size {world_size}. Each rank's slice of every batch and its RNG streams depend on the world "
            f"size, so exact continuation is impossible: relaunch with {saved} processes "
            f"(--nproc {saved} or torchrun --nproc_per_node ...), or start a fresh --out")


def check_config(cfg, seq_lens, decompose: bool = False) -> None:
    """Every distributed bad input fails here, before any worker starts (``cfg``: a RunConfig; ``decompose``:
    some arm uses packing=decompose, whose every power-of-two bucket up to max(seq_lens) is a row length)."""
    dc, tr = cfg.dist, cfg.train
    if not isinstance(dc.nproc, int) or isinstance(dc.nproc, bool) or dc.nproc < 1:
        raise ValueError(f"dist.nproc must be an int >= 1, got {dc.nproc!r}")
    world = env_world_size() if under_launcher() else dc.nproc
    check_parallel(dc.parallel, world)
    placement(dc.dist_backend, dc.device, world)
    lens = set(seq_lens)
    if decompose:
        lens |= {1 << k for k in range(max(seq_lens).bit_length())}  # every decompose bucket length
    check_world_size(tr.tokens_per_batch, lens, world)


def env_world_size() -> int:
    """The world size torchrun (or our launcher) set for this process; 1 outside of one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def under_launcher() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str, cuda_available: bool | None = None) -> str:
    """"auto" -> cuda when torch sees a GPU, else cpu; a clear error when ``name`` cannot run here."""
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    if name not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {name!r}")
    if name == "auto":
        return "cuda" if cuda else "cpu"
    if name == "cuda" and not cuda:
        raise ValueError("device 'cuda' is unavailable: torch.cuda.is_available() is False; use --device cpu")
    return name


def placement(backend: str, device: str, world: int) -> tuple[str, str]:
    """(process-group backend or "" for one process, device) for a run of ``world`` processes.
    One process: ``device`` alone counts. Several: nccl on cuda, gloo on cpu; device "auto" follows the
    backend, and "cuda" makes backend "auto" pick nccl."""
    if world <= 1:
        if backend not in DIST_BACKENDS:
            raise ValueError(f"dist_backend must be one of {DIST_BACKENDS}, got {backend!r}")
        return "", resolve_device(device)
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    name = resolve_backend("nccl" if device == "cuda" and backend == "auto" else backend)
    dev = ("cuda" if name == "nccl" else "cpu") if device == "auto" else resolve_device(device)
    if (dev == "cuda") != (name == "nccl"):
        raise ValueError(f"device {dev!r} and dist_backend {name!r} do not match: multi-process runs use "
                         "nccl on cuda and gloo on cpu")
    return name, dev


@dataclass
class DistContext:
    """This process's place in the job; world_size 1 (no process group) outside of torchrun."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: str = ""                    # "" = no process group
    parallel: str = "ddp"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def fsdp(self) -> bool:
        return self.enabled and self.parallel == "fsdp"

    # ---------------------------------------------------------------- model
    def wrap(self, model: nn.Module) -> nn.Module:
        """Move ``model`` to the device and return the module to call in training.

        DDP wraps (``model`` stays the plain module used for evaluation and checkpoints); FSDP2
        shards each block, then the root, in place. Call before building the optimizer.
        """
        model.to(self.device)
        if not self.enabled:
            return model
        if self.fsdp:
            from torch.distributed.fsdp import fully_shard
            for blk in getattr(model, "blocks", []):
                fully_shard(blk)
            fully_shard(model)
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(model, device_ids=ids)

    def seed_rank_streams(self, seed: int) -> None:
        """Give ranks > 0 their own dropout stream (rank 0 keeps the 1-process one)."""
        if self.rank:
            torch.manual_seed(seed * 1_000_003 + self.rank)

    def segment_offsets(self, high: int, nseg: int, gen: torch.Generator) -> torch.Tensor:
        """(nseg + 1,) random position offsets in [0, high) for this rank's segments (the last entry is
        for the tail padding). Every rank draws one vector for all ranks' segments, in global batch order,
        from the same generator state and keeps its slice, so W ranks reproduce the 1-process offsets."""
        if not self.enabled:
            return torch.randint(0, high, (nseg + 1,), generator=gen)
        counts = torch.zeros(self.world_size, dtype=torch.int64, device=self._comm_device())
        counts[self.rank] = nseg
        dist.all_reduce(counts)
        counts = counts.tolist()
        start = sum(counts[:self.rank])
        off = torch.randint(0, high, (sum(counts) + 1,), generator=gen)
        return off[start:start + nseg + 1]

    def to_device(self, *tensors: torch.Tensor):
        if self.device.type == "cpu":
            return tensors
        return tuple(t.to(self.device, non_blocking=True) for t in tensors)

    # ---------------------------------------------------------------- reductions
    def host_sum(self, *values: float) -> list[float]:
        """Sum host-side numbers over ranks (float64) on a gloo group: no device sync, even under nccl."""
        if not self.enabled:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64)
        dist.all_reduce(t, group=_host_group(self.backend))
        return t.tolist()

    def union(self, mask):
        """Element-wise OR of a boolean numpy array over ranks (documents seen / cut by any rank)."""
        if not self.enabled:
            return mask
        t = torch.as_tensor(mask.astype("uint8"), device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.cpu().numpy().astype(bool)

    def written(self, path) -> None:
        """After rank 0 wrote ``path``: wait for it, and check every rank can read it (resume and
        restore_best read checkpoints on every rank, so --out must be on a filesystem all nodes share)."""
        if not self.enabled:
            return
        dist.barrier()
        if not os.path.exists(path):
            raise RuntimeError(f"rank {self.rank} cannot see {path}, which rank 0 wrote: --out must be on a "
                               "filesystem shared by every node")

    def _comm_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")

    # ---------------------------------------------------------------- evaluation
    def eval_model(self, model: nn.Module) -> nn.Module:
        """Wrap ``model`` for evaluation code written for CPU tensors: sharded over ranks, on the device."""
        if isinstance(model, ShardedEval) or (not self.enabled and self.device.type == "cpu"):
            return model
        return ShardedEval(model, self)

    # ---------------------------------------------------------------- checkpoints
    def model_state(self, model: nn.Module) -> dict:
        """Full (unsharded) model state on CPU; collective under FSDP."""
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
            return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}

    def load_model(self, model: nn.Module, state: dict) -> None:
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
            set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
        else:
            model.load_state_dict(state)

    def plain_copy(self, model: nn.Module, build) -> nn.Module:
        """A CPU copy of ``model`` that is an ordinary module (FSDP modules cannot be deep-copied)."""
        if not self.fsdp:
            return copy.deepcopy(model).cpu()
        state = self.model_state(model)
        obj = [state]
        dist.broadcast_object_list(obj, src=0)  # only rank 0 holds the full state (cpu_offload)
        fresh = build()
        fresh.load_state_dict(obj[0])
        return fresh

    def checkpoint_state(self, sd: dict, model: nn.Module, opt, gen: torch.Generator) -> dict:
        """Add what a distributed resume needs; collective (every rank must call it)."""
        sd["world_size"], sd["parallel"] = self.world_size, (self.parallel if self.enabled else "none")
        if not self.enabled:
            return sd
        rng = [None] * self.world_size
        mine = {"torch_rng": torch.get_rng_state(), "offset_rng": gen.get_state()}
        if self.device.type == "cuda":  # dropout on the GPU
            mine["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        dist.all_gather_object(rng, mine)
        sd["rank_rng"] = rng
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
            sd["model"], sd["opt"] = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True,
                                                                                          cpu_offload=True))
        return sd

    def check_resume(self, ck: dict, path) -> None:
        check_resume_world(ck, self.world_size, path)
        mode = self.parallel if self.enabled else "none"
        if self.enabled and ck.get("parallel", mode) != mode:
            raise ValueError(f"cannot resume from {path}: it was written with parallel={ck['parallel']!r}, "
                             f"this run uses {mode!r}")

    def load_state(self, ck: dict, model: nn.Module, opt, gen: torch.Generator) -> None:
        """Restore model, optimizer and this rank's RNG streams from a checkpoint dict."""
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
            set_state_dict(model, opt, model_state_dict=ck["model"], optim_state_dict=ck["opt"],
                           options=StateDictOptions(full_state_dict=True))
        else:
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["opt"])
        rng = ck["rank_rng"][self.rank] if self.enabled else ck
        torch.set_rng_state(rng["torch_rng"])
        gen.set_state(rng["offset_rng"])
        if "cuda_rng" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda_rng"], self.device)


class ShardedEval(nn.Module):
    """Evaluation adapter: takes CPU inputs, returns CPU logits (N, V) identical on every rank.

    A uniform layout (cu_seqlens = arange(B+1) * L) is split into contiguous document shards, padded
    to the same size on every rank (so FSDP's collective forwards match), run on the device and
    all-gathered. Other layouts run whole on every rank.
    """

    def __init__(self, model: nn.Module, ctx: DistContext):
        super().__init__()
        self.model, self.ctx = model, ctx
        self.train(model.training)

    def forward(self, tokens, cu_seqlens, max_seqlen: int, positions):
        ctx = self.ctx
        B, N = cu_seqlens.numel() - 1, tokens.numel()
        uniform = B > 0 and N % B == 0 and torch.equal(
            cu_seqlens.cpu(), torch.arange(B + 1, dtype=cu_seqlens.dtype) * (N // B))
        if not ctx.enabled or not uniform:
            t, cu, pos = ctx.to_device(tokens, cu_seqlens, positions)
            return self.model(t, cu, max_seqlen, pos).float().cpu()
        L, per = N // B, -(-B // ctx.world_size)
        lo, hi = min(B, ctx.rank * per), min(B, (ctx.rank + 1) * per)
        idx = torch.arange(lo, hi)
        idx = torch.cat([idx, idx.new_zeros(per - idx.numel())])                    # pad with document 0
        t = tokens.view(B, L)[idx].reshape(-1)
        pos = positions.view(B, L)[idx].reshape(-1)
        cu = torch.arange(per + 1, dtype=cu_seqlens.dtype) * L
        t, cu, pos = ctx.to_device(t, cu, pos)
        local = self.model(t, cu, L, pos).float().view(per, L, -1)                 # (per, L, V)
        comm = local.to(ctx._comm_device()).contiguous()
        parts = [torch.empty_like(comm) for _ in range(ctx.world_size)]
        dist.all_gather(parts, comm)
        return torch.cat(parts)[:B].reshape(N, -1).cpu()


_CTX = DistContext()
_HOST_GROUP = None


def _host_group(backend: str):
    """The default group under gloo; a second, gloo group for host numbers under nccl (made once)."""
    global _HOST_GROUP
    if backend == "gloo":
        return None
    if _HOST_GROUP is None:
        _HOST_GROUP = dist.new_group(backend="gloo")
    return _HOST_GROUP


def context() -> DistContext:
    """The current process's DistContext (world size 1 until :func:`init_distributed`)."""
    return _CTX


def init_distributed(backend: str = "auto", parallel: str = "ddp", device: str = "auto") -> DistContext:
    """Join the process group that torchrun (or ``--nproc``) describes in the environment.

    Outside of a launcher this returns a world-size-1 context on ``device`` (auto | cpu | cuda) and
    creates no process group. Under a launcher nccl puts rank r on cuda:LOCAL_RANK and gloo on the CPU;
    device "auto" follows the backend, "cuda" makes backend "auto" pick nccl.
    """
    global _CTX
    world = env_world_size()
    check_parallel(parallel, world)
    if world > 1:
        missing = [k for k in TORCHRUN_ENV if k not in os.environ]
        if missing:
            raise ValueError(f"WORLD_SIZE={world} is set but {missing} are not: launch with torchrun or --nproc")
    name, dev = placement(backend, device, world)
    if world <= 1:
        _CTX = DistContext(parallel=parallel, device=torch.device(dev, 0) if dev == "cuda" else torch.device("cpu"))
        if dev == "cuda":
            torch.cuda.set_device(_CTX.device)
        return _CTX
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    device_ = torch.device("cpu")
    if name == "nccl":
        device_ = torch.device("cuda", local_rank)
        torch.cuda.set_device(device_)
    if not dist.is_initialized():  # a bounded collective timeout: a survivor of a dead rank errors, never hangs
        dist.init_process_group(name, rank=rank, world_size=world, timeout=collective_timeout(),
                                **({"device_id": device_} if name == "nccl" else {}))
    _CTX = DistContext(rank, world, local_rank, local_world, name, parallel, device_)
    return _CTX


def collective_timeout():
    """$LENGEN_DIST_TIMEOUT_S (default 600 s): how long a collective waits for a rank that never arrives. torchrun's
    agent stops the survivors of a dead worker within about a second on one node; this bounds every other case."""
    import datetime
    v = os.environ.get("LENGEN_DIST_TIMEOUT_S", "600")
    try:
        s = float(v)
        if not s > 0:
            raise ValueError
    except ValueError:
        raise ValueError(f"LENGEN_DIST_TIMEOUT_S must be a positive number of seconds, got {v!r}") from None
    return datetime.timedelta(seconds=s)


def shutdown() -> None:
    global _CTX, _HOST_GROUP
    _HOST_GROUP = None
    if dist.is_initialized():
        dist.destroy_process_group()
    _CTX = DistContext()
