"""The data pipeline: token sources, audit, decomposition, packing, curricula and the loader.

    src = open_tokens("train.arrow")                 # zero-copy, memory-mapped
    print(audit(src, context_len=8192))
    loader = PackedLoader(src, LoaderConfig(strategy="vsl", tokens_per_batch=65536,
                                            max_len=8192, curriculum="grow_p2"))
    for batch in loader: ...                          # flat input_ids, labels, cu_seqlens, ...
"""
from .audit import AuditReport, audit
from .corpus import (BYTE_VOCAB, embedded_corpus, synthetic_lengths, synthetic_source, synthetic_table,
                     write_arrow)
from .curriculum import CURRICULA, bucket_schedule
from .decompose import Decomposition, decompose, decompose_numpy, decompose_ref
from .loader import Batch, LoaderConfig, PackedLoader
from .pack import Packing, concat_chunk, pack_bfd, pack_bfd_ref, pack_first_fit_ref
from .source import TokenSource, open_tokens

__all__ = ["AuditReport", "audit", "BYTE_VOCAB", "embedded_corpus", "synthetic_lengths", "synthetic_source",
           "synthetic_table", "write_arrow", "CURRICULA", "bucket_schedule", "Decomposition", "decompose",
           "decompose_numpy", "decompose_ref", "Batch", "LoaderConfig", "PackedLoader", "Packing",
           "concat_chunk", "pack_bfd", "pack_bfd_ref", "pack_first_fit_ref", "TokenSource", "open_tokens"]
