"""fusedopt.engine.layout's numbers as Triton constexprs, and how a kernel block finds its tensor.

@triton.jit functions may read no module global that is not a constexpr, so the kernels take the
schema from here rather than from fusedopt.engine.layout directly.
"""
import triton
import triton.language as tl

from fusedopt.engine import int8, layout

BLOCK = tl.constexpr(layout.BLOCK)
STATE_ALIGN = tl.constexpr(layout.STATE_ALIGN)

PARAM_ADDR = tl.constexpr(layout.PARAM_ADDR)
GRAD_ADDR = tl.constexpr(layout.GRAD_ADDR)
GROUP = tl.constexpr(layout.GROUP)
NUMEL = tl.constexpr(layout.NUMEL)
STATE_START = tl.constexpr(layout.STATE_START)

LR = tl.constexpr(layout.LR)
MAX_LR = tl.constexpr(layout.MAX_LR)
WEIGHT_DECAY = tl.constexpr(layout.WEIGHT_DECAY)
CORRECTED = tl.constexpr(layout.CORRECTED)
FIRST_ALGORITHM_COLUMN = tl.constexpr(layout.FIRST_ALGORITHM_COLUMN)
HYPER_COLUMNS = tl.constexpr(layout.HYPER_COLUMNS)

GRAD_NORM = tl.constexpr(layout.GRAD_NORM)
CLIP_COEF = tl.constexpr(layout.CLIP_COEF)
FOUND_INF = tl.constexpr(layout.FOUND_INF)
INV_SCALE = tl.constexpr(layout.INV_SCALE)
SKIPPED_STEPS = tl.constexpr(layout.SKIPPED_STEPS)
SCALE = tl.constexpr(layout.SCALE)

# 8-bit state (fusedopt/engine/int8.py).
INT8_GROUP = tl.constexpr(int8.GROUP)
INT8_TOP_EXPONENT = tl.constexpr(int8.TOP_EXPONENT)
INT8_MIN_SCALE = tl.constexpr(int8.MIN_SCALE)
INT8_SPLIT = tl.constexpr(int8.SPLIT)
INT8_SIGNED_MANTISSA = tl.constexpr(int8.MANTISSA_BITS["signed"])
INT8_SQRT_MANTISSA = tl.constexpr(int8.MANTISSA_BITS["sqrt"])


def algorithm_column(algorithm_hyper, name):
    """The table column of one of an algorithm's own hyperparameters, as a constexpr."""
    return tl.constexpr(layout.hyper_columns(algorithm_hyper)[name])


@triton.jit
def block_owner(tensor_block_start_ptr, num_segment_tensors, block):
    """The segment-local tensor that kernel block `block` covers: the last i < num_segment_tensors
    with tensor_block_start[i] <= block (a tensor without elements has no blocks: its start
    equals the next one's, and the search passes over it). A binary search over the segment's
    starts, log2(T) loads of an array of a few KB that stays in L1, instead of a table of each
    block's tensor: 4 B a block, 1 MB at 1.1B params, resident through the training iteration's
    memory peak."""
    lo = 0
    hi = num_segment_tensors
    while hi - lo > 1:
        mid = (lo + hi) // 2
        at_or_after = tl.load(tensor_block_start_ptr + mid) <= block
        lo = tl.where(at_or_after, mid, lo)
        hi = tl.where(at_or_after, hi, mid)
    return lo
