"""Element helpers every algorithm's Triton math shares: powers, rounding to the storage dtype,
the (corrected) decay factor and the two statistics columns every algorithm reports."""
import os

import triton
import triton.language as tl

from .layout import CORRECTED, LR, MAX_LR, WEIGHT_DECAY

# The interpreter runs a tl.reduce with a Python combine function element by element: 3.6 s for
# one 4096-element block of AdamW's six statistics on a CI core, against 0.1 s for the rest of
# the update. Interpreted, the statistics reduce one column at a time with tl.sum/min/max (the
# same figures up to summation order); compiled, in one tl.reduce (fewer barriers).
INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def power(base, exponent):
    """base ** exponent by squaring, in fp64: exact to a few ulps for any step count (an exp2/log2
    in fp32 would put a 1e-4 relative error on 1 - beta2 ** t at t = 1)."""
    result = base * 0.0 + 1.0
    remaining = exponent
    while remaining > 0:
        result = tl.where((remaining & 1) == 1, result * base, result)
        base = base * base
        remaining = remaining >> 1
    return result


@triton.jit
def divide_by_uniform(x, divisor, reciprocal):
    """x / divisor rounded as IEEE division rounds it, for a divisor the block shares and its
    reciprocal RN(1 / divisor) formed once: q = RN(x * reciprocal) is within an ulp of the
    quotient, and one correction by the residual RN(x - q * divisor) rounds it correctly
    (Markstein 1990, IBM J. Res. Dev. 34(1); no exception in 453.8M fp32 pairs over 2269
    divisors, bench/check_uniform_division.py; tests/test_triton_math.py checks this function).
    Three FMA-pipe instructions against about ten for tl.div_rn. Exact where the quotient is 0,
    infinite or in fp32's normal range and q does not overflow; an infinite x, whose residual
    would be inf - inf, keeps q."""
    estimate = x * reciprocal
    corrected = tl.fma(tl.fma(-estimate, divisor, x), reciprocal, estimate)
    return tl.where(tl.abs(x) == float("inf"), estimate, corrected)


@triton.jit
def store_rounding(x, dtype: tl.constexpr):
    """fp32 -> storage dtype, round to nearest even as torch's casts do. bf16 is rounded with
    integer ops: Triton 3.9's interpreter truncates fp32 -> bf16 casts (even with
    fp_downcast_rounding="rtne"), and the same bits come out of the GPU's cvt.rn.bf16.f32."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def decay_multiplier(row):
    """k of the decay lr * wd * k in fp64: lr / max_lr for corrected groups (AdamC / SGDC /
    LionC, Defazio 2025, arXiv 2506.02285), else 1; max_lr 0 (the default for a group built
    with lr = 0) gives k = 0, not a division by zero."""
    max_lr = tl.load(row + MAX_LR).to(tl.float64)
    ratio = tl.load(row + LR).to(tl.float64) / tl.where(max_lr > 0, max_lr, 1.0)
    return tl.where(tl.load(row + CORRECTED) != 0, tl.where(max_lr > 0, ratio, 0.0), 1.0)


@triton.jit
def lr_and_decay(row):
    """(lr, 1 - lr * wd * k) in fp64: the decoupled decay factor of AdamW and Lion."""
    lr = tl.load(row + LR).to(tl.float64)
    return lr, 1.0 - lr * tl.load(row + WEIGHT_DECAY).to(tl.float64) * decay_multiplier(row)


@triton.jit
def weight_decay_coefficient(row):
    """wd * k in fp64: SGD's L2 decay coefficient."""
    return tl.load(row + WEIGHT_DECAY).to(tl.float64) * decay_multiplier(row)


@triton.jit
def _sum_three(w1, d1, s1, w2, d2, s2):
    return w1 + w2, d1 + d2, s1 + s2


@triton.jit
def reduce_three_sums(a0, a1, a2, a3, a4, a5):
    """A block's three summed statistics (SGD's and Lion's columns) from their per-element
    running values, in one reduction; the columns they do not have are 0."""
    c0, c1, c2 = tl.reduce((a0, a1, a2), 0, _sum_three)
    return c0, c1, c2, 0.0, 0.0, 0.0


@triton.jit
def common_stats(p_new, p_old, mask, MASKED: tl.constexpr):
    """The per-element operands of weight_sumsq and update_sumsq; masked lanes (which loaded 0
    and computed garbage from it) contribute 0. Only tail blocks pay for the selects: applied to
    every block they cost 13% of the update at 1.1B fp32 (H100)."""
    if MASKED:
        p_new = tl.where(mask, p_new, 0.0)
        p_old = tl.where(mask, p_old, 0.0)
    delta = p_new - p_old
    return p_new * p_new, delta * delta

