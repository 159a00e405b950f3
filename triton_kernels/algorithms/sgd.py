"""SGD / SGDC element math (torch.optim.SGD): d = g + wd*k*p; with momentum buf = d at t == 1,
else momentum*buf + (1-dampening)*d; d = d + momentum*buf (nesterov) or buf; p -= lr*d.
Bytes per element, fp32: with momentum read p, g, buf and write p, buf = 20 B; without momentum
the buffer is neither read nor written (torch keeps it None): 12 B.
Statistics: sum p_new^2, sum (p_new - p_old)^2, sum buf^2: update() gives their per-element
operands, reduce_statistics() a block's from them.
"""
import triton
import triton.language as tl

# STATE_CODES: the formats of 8-bit state, which update.py reads from here.
from fusedopt.algorithms.sgd import HYPER, STATE_CODES, STATS

from ..layout import LR, algorithm_column
from ..math import common_stats, reduce_three_sums, store_rounding, weight_decay_coefficient

MOMENTUM = algorithm_column(HYPER, "momentum")
DAMPENING = algorithm_column(HYPER, "dampening")
NESTEROV = algorithm_column(HYPER, "nesterov")
NUM_STATES = 1
NUM_STATS = len(STATS)
# 2 bits a column: the reduction op of each statistics column (neutral partials of empty blocks).
STAT_OPS = sum(op << (2 * column) for column, (_, op) in enumerate(STATS))
# SGD's three statistics are sums.
reduce_statistics = reduce_three_sums


@triton.jit
def uses_state(row):
    return tl.load(row + MOMENTUM) != 0


@triton.jit
def coefficients(row, step):
    """The block's scalars: the decay coefficient wd * k (fp64), momentum, dampening, nesterov,
    lr, and whether this is the buffer's first step."""
    return (weight_decay_coefficient(row), tl.load(row + MOMENTUM), tl.load(row + DAMPENING),
            tl.load(row + NESTEROV), tl.load(row + LR), step == 1)


@triton.jit
def update(p_old, g, buf, unused, k, mask, DTYPE: tl.constexpr, MASKED: tl.constexpr,
           STATS: tl.constexpr, STATE_INT8: tl.constexpr):
    weight_decay, momentum = k[0], k[1]
    direction = g
    if weight_decay != 0:
        direction = direction + weight_decay.to(tl.float32) * p_old
    if momentum != 0:
        buf = tl.where(k[5], direction, momentum * buf + (1.0 - k[2]) * direction)
        if k[3] != 0:
            direction = direction + momentum * buf
        else:
            direction = buf
    p_new = store_rounding(p_old - k[4] * direction, DTYPE)
    t0, t1, t2, t3, t4, t5 = 0.0, 0.0, 0.0, 0.0, 0.0, 0.0
    if STATS:
        weight_sq, delta_sq = common_stats(p_new.to(tl.float32), p_old, mask, MASKED)
        buf_sq = buf * buf
        if MASKED:
            buf_sq = tl.where(mask, buf_sq, 0.0)
        buf_sq = tl.where(momentum != 0, buf_sq, 0.0)
        t0, t1, t2, t3, t4, t5 = weight_sq, delta_sq, buf_sq, 0.0, 0.0, 0.0
    return p_new, buf, unused, t0, t1, t2, t3, t4, t5


@triton.jit
def observe(p, buf, unused, row, step, mask):
    return p * p, 0.0, buf * buf, 0.0, 0.0, 0.0
