"""Pure-torch references: THE SPEC for every op.

Every backend is tested against these functions, and the benchmarks use them as the eager
baseline. They favour clarity over speed and compute in fp32 (fp64 where a test needs it).
Each op owns one section below; keep sections independent.
"""
from __future__ import annotations

import torch

# ============================================================================ attention
# (section owned by the attention op: varlen_attention_ref)


# ================================================================================= rope
# (section owned by the rope op: apply_rope_ref)
