"""Which transformers does the Hugging Face integration need, and which of its hooks does it use?

transformers is an optional dependency (``pip install lengen_fast[hf]``); it is imported here, lazily, by
``register`` and ``patch_rope`` only, so ``import lengen_fast.integrations.hf`` works without it.
"""
from __future__ import annotations

MIN_TRANSFORMERS = "4.53"  # masking_utils' AttentionMaskInterface; keep in step with pyproject's extras
_INSTALL = "pip install lengen_fast[hf]"


def _transformers():
    """The pieces of transformers we hook into; a clear ImportError when it is missing or too old."""
    try:
        import transformers
    except ImportError as e:
        raise ImportError(f"lengen_fast.integrations.hf needs Hugging Face transformers: {_INSTALL}") from e
    try:
        from transformers.modeling_utils import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask
    except ImportError as e:
        raise ImportError(f"lengen_fast.integrations.hf needs transformers>={MIN_TRANSFORMERS} (found "
                          f"{getattr(transformers, '__version__', '?')}): {_INSTALL} --upgrade") from e
    return AttentionInterface, AttentionMaskInterface, flash_attention_mask
