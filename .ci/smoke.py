"""CI smoke test of an installed wheel, run from a folder outside the checkout: does the package work there?

Checks that lengen_fast is imported from site-packages (not a checkout), that the C++ extension loads, that every
CPU instruction-set path this machine has gives the same decomposition as the portable one (the path a CPU
without AVX2 / AVX-512 takes), and that attention and RoPE match the pure-torch reference.
"""
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

import lengen_fast
from lengen_fast import backends, reference
from lengen_fast.data import decompose_numpy, synthetic_lengths

pkg = Path(lengen_fast.__file__).resolve().parent
assert "site-packages" in pkg.parts, f"lengen_fast imported from {pkg}, not from an installed wheel"
assert not (pkg.parent / "pyproject.toml").exists(), "imported from a checkout"
info = backends.describe()
print(json.dumps({"lengen_fast": lengen_fast.__version__, "from": str(pkg), **info}))
ext = backends.cpu_ext()
assert ext is not None, "lengen_fast._C did not load from the wheel"

lengths = synthetic_lengths(300_000, seed=0, mean=1000, sigma=1.5)  # > 100k: the threaded split too
levels = ["portable", "avx2", "avx512"]
levels = levels[:levels.index(ext.cpu_isa_detected()) + 1]
out = {}
for level in levels:
    os.environ["LENGEN_CPU_ISA"] = level
    assert ext.cpu_isa() == level
    d, s, rd, rs, rl, *stats = ext.data_decompose(lengths, 64, 8192, True, True)
    out[level] = ([a.tobytes() for a in (*d, *s, rd, rs, rl)], stats, d)
os.environ.pop("LENGEN_CPU_ISA")
assert all(v[:2] == out["portable"][:2] for v in out.values()), "ISA paths disagree"
want = decompose_numpy(lengths, 64, 8192, remainder=True)
assert all(np.array_equal(a, b) for a, b in zip(want.docs, out["portable"][2], strict=True))
print(f"decompose: {', '.join(levels)} bitwise equal to each other and to numpy")

torch.manual_seed(0)
cu = torch.tensor([0, 5, 17, 40], dtype=torch.int32)
q, k, v = (torch.randn(40, 2, 16) for _ in range(3))
got = lengen_fast.varlen_attention(q, k, v, cu, None, 23, 23, causal=True, backend="cpu")
ref = reference.varlen_attention_ref(q, k, v, cu, causal=True)
err = (got - ref).abs().max().item()
assert err < 1e-4, f"attention max error {err}"
pos = reference.positions_from_cu_seqlens(cu, 40)
inv, af = lengen_fast.rope_frequencies(16, 10000.0, None)
rq, rk = lengen_fast.apply_rope(q, k, cu_seqlens=cu, base=10000.0, backend="cpu")
wq, wk = reference.apply_rope_ref(q, k, pos, inv, af)
err_r = max((rq - wq).abs().max().item(), (rk - wk).abs().max().item())
assert err_r < 1e-4, f"rope max error {err_r}"
print(f"attention and RoPE on CPU match the reference (max errors {err:.1e}, {err_r:.1e})")
print("smoke OK", sys.version.split()[0], torch.__version__)
