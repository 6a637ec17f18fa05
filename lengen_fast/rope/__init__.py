"""lengen_fast.rope: fused RoPE with context-extension scaling. Where is each part of the op?

- ``scaling.py``: which frequencies each scaling gives (RopeScaling, rope_frequencies: the spec) and the
  one reader of a transformers config (rope_config_from_hf).
- ``op.py``: how a call reaches a kernel (torch.library custom ops, fake kernels, autograd, PosMode, the
  per-backend implementation table).
- ``api.py``: how to rotate q and k (apply_rope, RotaryEmbedding, input checks).
- ``triton.py``: the Triton kernel; the C++ CPU and CUDA kernels are in csrc/rope/, the rotation's
  reference in ``reference.apply_rope_ref``, the tests in python_tests/test_rope.py, the benchmark in
  bench/bench_rope.py.
"""

from .api import RotaryEmbedding, apply_rope  # noqa: F401
from .scaling import KINDS, HFRopeConfig, RopeScaling, rope_config_from_hf, rope_frequencies  # noqa: F401
