"""Lion / LionC element math (Chen et al. 2023, arXiv 2302.06675, Algorithm 2):
    c = b1*m + (1-b1)*g; p = p*(1 - lr*wd*k) - lr*sign(c); m = b2*m + (1-b2)*g
Bytes per element, fp32: read p, g, m and write p, m = 20 B; bf16 params 14 B.
Statistics: sum p_new^2, sum (p_new - p_old)^2, sum m_new^2: update() gives their per-element
operands, reduce_statistics() a block's from them.
"""
import triton
import triton.language as tl

# STATE_CODES: the formats of 8-bit state, which update.py reads from here.
from fusedopt.algorithms.lion import HYPER, STATE_CODES, STATS

from ..layout import algorithm_column
from ..math import common_stats, lr_and_decay, reduce_three_sums, store_rounding

BETA1 = algorithm_column(HYPER, "beta1")
BETA2 = algorithm_column(HYPER, "beta2")
NUM_STATES = 1
NUM_STATS = len(STATS)
# 2 bits a column: the reduction op of each statistics column (neutral partials of empty blocks).
STAT_OPS = sum(op << (2 * column) for column, (_, op) in enumerate(STATS))
# Lion's three statistics are sums.
reduce_statistics = reduce_three_sums


@triton.jit
def uses_state(row):
    return True


@triton.jit
def coefficients(row, step):
    """The block's scalars, formed once in fp64 and rounded to fp32: lr, decay, beta1,
    1 - beta1, beta2, 1 - beta2."""
    lr, decay = lr_and_decay(row)
    beta1 = tl.load(row + BETA1).to(tl.float64)
    beta2 = tl.load(row + BETA2).to(tl.float64)
    return (lr.to(tl.float32), decay.to(tl.float32), beta1.to(tl.float32),
            (1.0 - beta1).to(tl.float32), beta2.to(tl.float32), (1.0 - beta2).to(tl.float32))


@triton.jit
def update(p_old, g, m, unused, k, mask, DTYPE: tl.constexpr, MASKED: tl.constexpr,
           STATS: tl.constexpr, STATE_INT8: tl.constexpr):
    c = k[2] * m + k[3] * g
    sign = tl.where(c > 0, 1.0, tl.where(c < 0, -1.0, 0.0))
    p_new = store_rounding(p_old * k[1] - k[0] * sign, DTYPE)
    m = k[4] * m + k[5] * g
    t0, t1, t2, t3, t4, t5 = 0.0, 0.0, 0.0, 0.0, 0.0, 0.0
    if STATS:
        weight_sq, delta_sq = common_stats(p_new.to(tl.float32), p_old, mask, MASKED)
        m_sq = m * m
        if MASKED:
            m_sq = tl.where(mask, m_sq, 0.0)
        t0, t1, t2, t3, t4, t5 = weight_sq, delta_sq, m_sq, 0.0, 0.0, 0.0
    return p_new, m, unused, t0, t1, t2, t3, t4, t5


@triton.jit
def observe(p, m, unused, row, step, mask):
    return p * p, 0.0, m * m, 0.0, 0.0, 0.0
