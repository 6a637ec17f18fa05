"""How does our data pipeline (decomposition, packing, VSL curricula) feed HF Trainer with no accelerate flags?

    Trainer(model=model, args=TrainingArguments("out", per_device_train_batch_size=1, ...),
            train_dataset=hf.vsl_dataset("tokens/", tokens_per_batch=65536, max_len=8192, curriculum="grow_p2"),
            data_collator=hf.PackedCollator()).train()

``vsl_dataset`` is an IterableDataset of small :class:`StepRef` items, in the order (step 0, rank 0), (step 0,
rank 1), ..., (step 0, rank W-1), (step 1, rank 0), ... where W is the world size (torchrun's WORLD_SIZE, or the
initialized process group). ``PackedCollator`` turns each StepRef into that rank's PackedLoader batch: every rank
computes the same plan from the seed, so step k is one bucket on every rank and ranks hold disjoint pieces.

Why this order works under both ways accelerate can feed an IterableDataset:
  - default (``dispatch_batches`` unset = True for an IterableDataset): rank 0 iterates and, with
    per_device_train_batch_size=1, hands the i-th of every W consecutive batches to rank i, i.e. (step k, rank i);
  - ``dispatch_batches=False``: every rank iterates the stream and accelerate's IterableDatasetShard keeps
    items i, i+W, ... on rank i: again (step k, rank i). Items are references, so a rank gathers only its own.
Dispatch concatenates the W ranks' batches, so the collated tensors must share their shape: every rank's batch
holds exactly tokens_per_batch / W tokens (the loader pads), and the collator emits only (1, T) tensors
(``input_ids``, ``labels``, ``position_ids``; the attention derives the documents from position_ids on the device).
With per_device_train_batch_size = b > 1, each forward packs b consecutive items (b loader steps); the ranks'
data stay disjoint and cover the epoch, but a step then mixes b buckets: keep b = 1 for one bucket per step.
``len()`` is steps x W, so Trainer counts epochs in loader steps; ``set_epoch`` (called by accelerate) selects the
epoch, so a resumed run continues the same stream.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch


def _world_size() -> int:
    """The data-parallel world size: the initialized process group, else torchrun's WORLD_SIZE, else 1."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        raise ValueError(f"vsl_dataset: WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


@dataclass(frozen=True, eq=False)
class StepRef:
    """One rank's batch of one loader step, assembled by PackedCollator when it is collated (cheap to shard)."""
    dataset: "VSLDataset"
    epoch: int
    step: int
    rank: int

    def batch(self):
        return self.dataset.loader(self.rank).make_batch(self.epoch, self.step)


class VSLDataset(torch.utils.data.IterableDataset):
    """The stream of :class:`StepRef` described in the module doc; build it with :func:`vsl_dataset`."""

    def __init__(self, source, config, world: int):
        from ...data import PackedLoader, open_tokens
        from ...data.source import TokenSource

        self.source = source if isinstance(source, TokenSource) else open_tokens(source)
        self.world = world
        self.config = dataclasses.replace(config, world_size=world, rank=0, prefetch=0, infinite=False)
        self._loaders = {0: PackedLoader(self.source, self.config)}        # validates the config for this world size
        self.steps = len(self._loaders[0])
        self._epoch = 0

    def loader(self, rank: int):
        from ...data import PackedLoader

        if rank not in self._loaders:
            self._loaders[rank] = PackedLoader(self.source, dataclasses.replace(self.config, rank=rank))
        return self._loaders[rank]

    def __len__(self) -> int:
        return self.steps * self.world

    def set_epoch(self, epoch: int) -> None:
        self._epoch = int(epoch)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        if info is not None and info.num_workers > 1:
            raise ValueError(f"vsl_dataset: dataloader_num_workers={info.num_workers} would give every worker the "
                             "whole stream (duplicated batches); use 0 or 1 (a batch is a memory-mapped gather)")
        epoch = self._epoch
        self._epoch += 1  # a loop without set_epoch moves on to the next epoch; set_epoch overrides it
        for step in range(self.steps):
            for rank in range(self.world):
                yield StepRef(self, epoch, step, rank)


def vsl_dataset(source, config=None, *, world_size: int | None = None, **overrides) -> VSLDataset:
    """A Trainer ``train_dataset`` running our loader (decomposition + VSL curriculum by default) on every rank.

    source: a token file/directory/table for ``open_tokens``, or a TokenSource. config: a LoaderConfig; keyword
    overrides set its fields (``tokens_per_batch`` is global: all ranks together, per loader step). The world size
    comes from torchrun's environment or the process group (``world_size`` overrides it); accelerate picks the rank.
    """
    from ...data import LoaderConfig

    config = config or LoaderConfig()
    unknown = sorted(set(overrides) - set(LoaderConfig.__dataclass_fields__))
    if unknown:
        raise TypeError(f"vsl_dataset: unknown LoaderConfig fields {unknown}")
    config = dataclasses.replace(config, **overrides)
    w = _world_size() if world_size is None else int(world_size)
    return VSLDataset(source, config, w)
