"""AdamW / AdamC element math (torch.optim.AdamW's form of the update), fp32 elements, scalars
formed in fp64 as torch.optim forms them in Python doubles:
    p *= 1 - lr*wd*k; m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g^2
    p -= (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
Bytes per element: fp32 params read g, p, m, v and write p, m, v = 28 B; bf16 params 22 B.
Statistics: sum p_new^2, sum (p_new - p_old)^2, min/max/sum v-hat, count(g^2 < v_prev):
update() gives their per-element operands, reduce_statistics() a block's from them.
"""
import triton
import triton.language as tl

# STATE_CODES: the formats of 8-bit state, which update.py reads from here.
from fusedopt.algorithms.adamw import HYPER, STATE_CODES, STATS

from ..layout import algorithm_column
from ..math import common_stats, divide_by_uniform, lr_and_decay, power, store_rounding

BETA1 = algorithm_column(HYPER, "beta1")
BETA2 = algorithm_column(HYPER, "beta2")
EPS = algorithm_column(HYPER, "eps")
NUM_STATES = 2
NUM_STATS = len(STATS)
# 2 bits a column: the reduction op of each statistics column (neutral partials of empty blocks).
STAT_OPS = sum(op << (2 * column) for column, (_, op) in enumerate(STATS))


@triton.jit
def _combine(w1, d1, lo1, hi1, s1, c1, w2, d2, lo2, hi2, s2, c2):
    return w1 + w2, d1 + d2, tl.minimum(lo1, lo2), tl.maximum(hi1, hi2), s1 + s2, c1 + c2


@triton.jit
def reduce_statistics(a0, a1, a2, a3, a4, a5):
    """A block's six statistics from their per-element running values in one reduction: one
    round through shared memory instead of six (sm_90 PTX of the whole kernel, every path:
    29 -> 19 bar.sync)."""
    return tl.reduce((a0, a1, a2, a3, a4, a5), 0, _combine)


@triton.jit
def uses_state(row):
    return True


@triton.jit
def coefficients(row, step):
    """The block's scalars, formed once in fp64 and rounded to fp32: decay, beta1, 1 - beta1,
    beta2, 1 - beta2, eps, step size, sqrt(1 - beta2^t), 1 - beta2^t; then the fp32
    reciprocal of sqrt(1 - beta2^t), correctly rounded (math.divide_by_uniform); then 8-bit
    state's eps * sqrt(1 - beta2^t) and step size * sqrt(1 - beta2^t)."""
    lr, decay = lr_and_decay(row)
    beta1 = tl.load(row + BETA1).to(tl.float64)
    beta2 = tl.load(row + BETA2).to(tl.float64)
    correction1 = 1.0 - power(beta1, step)
    correction2 = 1.0 - power(beta2, step)
    correction2_sqrt = tl.sqrt(correction2)
    eps = tl.load(row + EPS)
    step_size = lr / correction1
    return (decay.to(tl.float32), beta1.to(tl.float32), (1.0 - beta1).to(tl.float32),
            beta2.to(tl.float32), (1.0 - beta2).to(tl.float32), eps, step_size.to(tl.float32),
            correction2_sqrt.to(tl.float32), correction2.to(tl.float32),
            tl.div_rn(tl.full([], 1.0, tl.float32), correction2_sqrt.to(tl.float32)),
            (eps.to(tl.float64) * correction2_sqrt).to(tl.float32),
            (step_size * correction2_sqrt).to(tl.float32))


@triton.jit
def update(p_old, g, m, v, k, mask, DTYPE: tl.constexpr, MASKED: tl.constexpr,
           STATS: tl.constexpr, STATE_INT8: tl.constexpr):
    eps, step_size, correction2_sqrt = k[5], k[6], k[7]
    gg = g * g
    v_old = v
    p = p_old * k[0]
    m = k[1] * m + k[2] * g
    v = k[3] * v + k[4] * gg
    # IEEE sqrt and division (Triton's defaults are approximate) to stay within rounding of
    # torch's sqrt() and addcdiv_.
    if STATE_INT8:
        # 8-bit state's update is bound by instruction issue, and its moments are approximate
        # anyway: sqrt(1 - beta2^t) moves into the block's scalars, m / (sqrt(v) + eps *
        # sqrt(1 - beta2^t)) times step size * sqrt(1 - beta2^t), the same quotient without a
        # division by it (6 instructions an element).
        p_new = store_rounding(p - k[11] * tl.div_rn(m, tl.sqrt_rn(v) + k[10]), DTYPE)
    else:
        # The division by the block's sqrt(1 - beta2^t) from its reciprocal, rounded as IEEE
        # division rounds it.
        denom = divide_by_uniform(tl.sqrt_rn(v), correction2_sqrt, k[9]) + eps
        p_new = store_rounding(p - step_size * tl.div_rn(m, denom), DTYPE)
    t0, t1, t2, t3, t4, t5 = 0.0, 0.0, 0.0, 0.0, 0.0, 0.0
    if STATS:
        weight_sq, delta_sq = common_stats(p_new.to(tl.float32), p_old, mask, MASKED)
        vhat = v / k[8]
        decreased = (gg < v_old).to(tl.float32)
        vhat_low, vhat_high, vhat_sum = vhat, vhat, vhat
        if MASKED:
            decreased = tl.where(mask, decreased, 0.0)
            vhat_low = tl.where(mask, vhat, float("inf"))
            vhat_high = tl.where(mask, vhat, float("-inf"))
            vhat_sum = tl.where(mask, vhat, 0.0)
        t0, t1, t2, t3, t4, t5 = weight_sq, delta_sq, vhat_low, vhat_high, vhat_sum, decreased
    return p_new, m, v, t0, t1, t2, t3, t4, t5


@triton.jit
def observe(p, m, v, row, step, mask):
    """A skipped step's statistics: the unchanged state, v-hat with the current t (none before
    the first step), no update, no decrease."""
    correction2 = tl.maximum(1.0 - power(tl.load(row + BETA2).to(tl.float64), step), 1e-300)
    correction2 = tl.where(step > 0, correction2, 1.0)
    vhat = v / correction2.to(tl.float32)
    return (p * p, 0.0, tl.where(mask, vhat, float("inf")), tl.where(mask, vhat, float("-inf")),
            vhat, 0.0)
