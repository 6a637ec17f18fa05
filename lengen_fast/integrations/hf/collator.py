"""How does a batch become one packed row with the FlashAttention kwargs, as transformers' trainers expect?

    Trainer(model=model, data_collator=hf.PackedCollator(), ...)

``PackedCollator`` flattens HF dataset rows, or one of our pipeline's packed batches, exactly as
transformers' ``DataCollatorWithFlattening`` does, plus ``cu_seq_lens_q/k`` and ``max_length_q/k``.
It needs numpy and torch only, not transformers.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


def _ints(x, what: str, row: bool = False) -> np.ndarray:
    """A 1-D int64 numpy view/copy of a list, numpy array or tensor. ``row``: one document's tokens, which must
    be 1-D (a (1, S) row is squeezed); a (B, S) row would otherwise be flattened into one document."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    try:
        a = np.asarray(x)
    except ValueError as e:  # ragged nested lists
        raise ValueError(f"PackedCollator: {what} is not a rectangular array of integers ({e})") from None
    if a.dtype == object or not (a.size == 0 or np.issubdtype(a.dtype, np.integer)):
        raise TypeError(f"PackedCollator: {what} must hold integers, got dtype {a.dtype}")
    if row:
        if a.ndim == 2 and a.shape[0] == 1:
            a = a[0]
        if a.ndim != 1:
            raise ValueError(f"PackedCollator: {what} must be 1-D (one document per row; (1, S) is squeezed), "
                             f"got shape {tuple(a.shape)}")
    return a.reshape(-1).astype(np.int64, copy=False)


def _pipeline_fields(obj) -> dict | None:
    """input_ids / labels / cu_seqlens of one of our pipeline's batches (a data.Batch or a mapping), else None."""
    if isinstance(obj, Mapping):
        return dict(obj) if "cu_seqlens" in obj else None
    if hasattr(obj, "cu_seqlens") and hasattr(obj, "input_ids"):
        return {"input_ids": obj.input_ids, "labels": getattr(obj, "labels", None), "cu_seqlens": obj.cu_seqlens}
    return None


@dataclass
class PackedCollator:
    """Flattens rows (HF dataset dicts with ``input_ids`` and optional ``labels``) or one of our
    pipeline's packed batches into a single packed row, exactly as transformers'
    ``DataCollatorWithFlattening`` does (same keys, same values), plus the FlashAttention kwargs
    ``cu_seq_lens_q/k`` and ``max_length_q/k`` by default, so the attention needs no host sync.

    Output: ``input_ids``, ``labels`` (``separator_id`` at each document's first token),
    ``position_ids`` (restarting at ``position_ids_start``): (1, T) int64; ``seq_idx`` (1, T) int32
    when asked; ``cu_seq_lens_q/k`` (n+1,) int32 and ``max_length_q/k`` python ints.
    A pipeline batch (``lengen_fast.data.Batch``, or a mapping with ``input_ids`` (T,) or (B, S),
    ``cu_seqlens`` and next-token ``labels``), alone or as a list of one, yields what
    DataCollatorWithFlattening would yield on its documents; zero-length documents and tokens after
    ``cu_seqlens[-1]`` are dropped.

    Items of ``vsl_dataset`` (StepRefs, any number per call) become their ranks' loader batches concatenated,
    padding kept (the padding is its own segment, labels -100), and only the (1, T) tensors ``input_ids``,
    ``labels`` and ``position_ids``: every rank then has the same T, as accelerate's batch dispatching needs.
    """

    return_position_ids: bool = True
    separator_id: int = -100
    return_flash_attn_kwargs: bool = True
    return_seq_idx: bool = False
    position_ids_start: int = 0
    return_tensors: str = "pt"

    def __call__(self, features, return_tensors: str | None = None, separator_id: int | None = None) -> dict:
        return_tensors = self.return_tensors if return_tensors is None else return_tensors
        separator_id = self.separator_id if separator_id is None else separator_id
        if return_tensors not in ("pt", "np"):
            raise ValueError(f"PackedCollator: return_tensors must be 'pt' or 'np', got {return_tensors!r}")
        if not isinstance(features, Sequence) or isinstance(features, (str, bytes)):
            features = [features]
        if len(features) == 0:
            raise ValueError("PackedCollator: features must be a non-empty list of rows or a pipeline batch")
        pipeline = _pipeline_fields(features[0]) if len(features) == 1 else None
        if hasattr(features[0], "batch") and hasattr(features[0], "rank"):
            return self._from_steps(features, return_tensors, separator_id)
        if pipeline is not None:
            ids, labels, lengths = self._from_pipeline(pipeline)
        else:
            ids, labels, lengths = self._from_rows(features)
        starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
        labels[starts] = separator_id
        batch: dict[str, Any] = {"input_ids": ids, "labels": labels}
        if self.return_position_ids:
            batch["position_ids"] = np.arange(ids.size) - np.repeat(starts, lengths) + self.position_ids_start
        if self.return_seq_idx:
            batch["seq_idx"] = np.repeat(np.arange(lengths.size), lengths).astype(np.int32)
        if self.return_flash_attn_kwargs:
            cu = np.concatenate(([0], np.cumsum(lengths))).astype(np.int32)
            batch["cu_seq_lens_q"], batch["cu_seq_lens_k"] = cu, cu.copy()
            batch["max_length_q"] = batch["max_length_k"] = int(lengths.max())
        for key, val in batch.items():
            if isinstance(val, np.ndarray):
                val = val[None] if key in ("input_ids", "labels", "position_ids", "seq_idx") else val
                batch[key] = torch.from_numpy(np.ascontiguousarray(val)) if return_tensors == "pt" else val
        return batch

    def _from_steps(self, refs, return_tensors: str, separator_id: int) -> dict:
        if len(refs) > 1 and not getattr(self, "_warned_steps", False):
            self._warned_steps = True
            warnings.warn(f"PackedCollator: {len(refs)} vsl_dataset items per batch (per_device_train_batch_size="
                          f"{len(refs)}) pack {len(refs)} consecutive loader steps, possibly of different buckets, "
                          "into one forward; set per_device_train_batch_size=1 for one bucket per step", stacklevel=2)
        ids, labels, pos = [], [], []
        for i, ref in enumerate(refs):
            if not (hasattr(ref, "batch") and hasattr(ref, "rank")):
                raise ValueError(f"PackedCollator: features[{i}] is a {type(ref).__name__}, but features[0] came from "
                                 "vsl_dataset; do not mix vsl_dataset items with other rows")
            b = ref.batch()
            n = int(b.input_ids.numel())
            x, y, lengths = self._from_pipeline({"input_ids": b.input_ids, "labels": b.labels,
                                                 "cu_seqlens": b.cu_seqlens})
            total = x.size
            starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
            y[starts] = separator_id
            p = np.arange(total) - np.repeat(starts, lengths) + self.position_ids_start
            ids += [x, b.input_ids.numpy()[total:].astype(np.int64)]
            labels += [y, np.full(n - total, -100, dtype=np.int64)]                 # padding: its own segment
            pos += [p, np.arange(n - total) + self.position_ids_start]
        batch = {"input_ids": np.concatenate(ids)[None], "labels": np.concatenate(labels)[None],
                 "position_ids": np.concatenate(pos)[None]}
        if return_tensors == "pt":
            batch = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}
        return batch

    @staticmethod
    def _from_rows(features):
        ids, labels, lengths = [], [], []
        has_labels = isinstance(features[0], Mapping) and "labels" in features[0]
        for i, row in enumerate(features):
            if not isinstance(row, Mapping) or "input_ids" not in row:
                raise ValueError(f"PackedCollator: features[{i}] must be a mapping with 'input_ids' (or the only "
                                 f"item a pipeline batch), got {type(row).__name__}")
            if ("labels" in row) != has_labels:
                raise ValueError(f"PackedCollator: features[{i}] {'lacks' if has_labels else 'has'} 'labels' "
                                 "unlike features[0]; give labels for all rows or none")
            x = _ints(row["input_ids"], f"features[{i}]['input_ids']", row=True)
            if x.size == 0:
                raise ValueError(f"PackedCollator: features[{i}]['input_ids'] is empty")
            ids.append(x)
            if has_labels:
                y = _ints(row["labels"], f"features[{i}]['labels']", row=True)
                if y.size != x.size:
                    raise ValueError(f"PackedCollator: features[{i}] has {y.size} labels for {x.size} input_ids")
                labels.append(y)
            lengths.append(x.size)
        ids = np.concatenate(ids)
        labels = np.concatenate(labels) if has_labels else ids.copy()
        return ids, labels, np.asarray(lengths, dtype=np.int64)

    @staticmethod
    def _from_pipeline(batch):
        ids = _ints(batch["input_ids"], "batch['input_ids']")
        cu = _ints(batch["cu_seqlens"], "batch['cu_seqlens']")
        if cu.size < 2 or cu[0] != 0 or (np.diff(cu) < 0).any() or cu[-1] > ids.size:
            raise ValueError(f"PackedCollator: batch['cu_seqlens'] must start at 0, not decrease and end at or "
                             f"before the {ids.size} tokens; got {cu.tolist()[:8]}{'...' if cu.size > 8 else ''}")
        if cu[-1] == 0:
            raise ValueError("PackedCollator: batch['cu_seqlens'] holds no tokens")
        total = int(cu[-1])
        lengths = np.diff(cu)
        lengths = lengths[lengths > 0]
        tokens = ids[:total].copy()
        if "labels" in batch and batch["labels"] is not None:
            shifted = _ints(batch["labels"], "batch['labels']")
            if shifted.size != ids.size:
                raise ValueError(f"PackedCollator: batch has {shifted.size} labels for {ids.size} input_ids")
            labels = np.empty(total, dtype=np.int64)  # ours predict token t+1 at t; HF's hold token t at t
            labels[1:] = shifted[:total - 1]
        else:
            labels = tokens.copy()
        return tokens, labels, lengths
