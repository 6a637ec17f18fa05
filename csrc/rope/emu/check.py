"""Compare the host-emulated CUDA rope kernel (built by check.sh) with the C++ CPU kernel.

Covers fp32/bf16/fp16, NeoX and GPT-J, full and partial rotary (vectorized and scalar paths), the three position
modes, in-place, strided (fused qkv) inputs, (B, S, H, D) with head-major storage, and the backward.
"""
import itertools

import rope_emu
import torch

import lengen_fast as lf
from lengen_fast import backends
from lengen_fast.rope import op as R


def emu_impl(*args):
    rope_emu.rope_apply_cuda(*R.ext_args(*args), 0)  # stream handle unused by the emulation


R.IMPLS["cuda"] = emu_impl
backends.available = lambda op, b, d: True
torch.manual_seed(0)
n = 0
for dt, inter, (D, Rd), mode, inplace, strided in itertools.product(
        (torch.float32, torch.bfloat16, torch.float16), (False, True), ((64, None), (72, 40), (36, 20), (128, 96)),
        ("cu", "pid", "arange"), (False, True), (False, True)):
    T = 23
    if strided:
        qkv = torch.randn(T, 5, D).to(dt)
        q, k = qkv[:, :3], qkv[:, 3:]
    else:
        q, k = torch.randn(T, 3, D).to(dt), torch.randn(T, 2, D).to(dt)
    kw = dict(rotary_dim=Rd, interleaved=inter, scaling=lf.RopeScaling("yarn", 4.0, 8), position_offset=5)
    if mode == "cu":
        kw["cu_seqlens"] = torch.tensor([0, 5, 5, 6, 23])
    if mode == "pid":
        kw["position_ids"] = torch.randint(0, 100000, (T,))
    want = lf.apply_rope(q, k, backend="cpu", **kw)
    if inplace:
        got = lf.apply_rope(q.clone(), k.clone(), backend="cuda", inplace=True, **kw)
    else:
        q0 = q.clone()
        got = lf.apply_rope(q, k, backend="cuda", **kw)
        assert torch.equal(q, q0), "out-of-place call modified q"
    for g, w in zip(got, want):
        err = (g.float() - w.float()).abs().max().item()
        # same fp32 math; 16-bit outputs may differ by one rounding of an fp32 value that differs in the last bit
        tol = 1e-6 if dt == torch.float32 else 2 ** -7 * w.float().abs().max().item()
        assert err <= tol, (dt, inter, D, Rd, mode, inplace, strided, err)
    n += 1
q, k = torch.randn(2, 3, 9, 64).transpose(1, 2), torch.randn(2, 9, 1, 64)
pid = torch.randint(0, 1 << 20, (2, 9))
for inter in (False, True):
    a = lf.apply_rope(q, k, position_ids=pid, backend="cuda", interleaved=inter)
    b = lf.apply_rope(q, k, position_ids=pid, backend="cpu", interleaved=inter)
    assert all((x - y).abs().max() < 1e-6 for x, y in zip(a, b))
    n += 1
qg, kg = torch.randn(10, 2, 32, requires_grad=True), torch.randn(10, 1, 32, requires_grad=True)
lf.apply_rope(qg, kg, backend="cuda", cu_seqlens=torch.tensor([0, 4, 10]))[0].sum().backward()
g1, qg.grad = qg.grad.clone(), None
lf.apply_rope(qg, kg, backend="cpu", cu_seqlens=torch.tensor([0, 4, 10]))[0].sum().backward()
assert (g1 - qg.grad).abs().max() < 1e-6
print("ok", n + 1, "cases")
