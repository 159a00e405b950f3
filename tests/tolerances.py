"""One tolerance table per dtype, for kernels against the reference (fusedopt backends).

fp32: both sides run the same fp32 formulas; differences come from operation order (lerp vs
mul-add, fused multiply-adds) and stay within a few ulps per step. Half types: the kernel and
the reference both round the fp32 result to the storage dtype, so an ulp flip of the fp32
value can move the stored value by one half-precision ulp (2^-8 relative for bf16).
"""
import torch

TOLERANCE = {
    torch.float64: dict(atol=1e-12, rtol=1e-10),
    torch.float32: dict(atol=2e-6, rtol=2e-5),
    torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
}
