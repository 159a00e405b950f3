"""update: the one traversal kernel of the update; the algorithm's math comes in as constexpr
functions (triton_kernels/algorithms/<name>.py), so unused paths compile away.

One program per BLOCK (4096 elements) of a segment: the program finds its tensor in the tensor
table (docs/kernel_contract.md), forms the step's scalars once, then in chunks (UPDATE_CHUNK;
INT8_UPDATE_CHUNK for 8-bit state) reads param and grad where their owners keep them and the
state from the segment's flat buffers, and writes param and state back. g is unscaled and
clipped here, in torch's order (unscale_'s g * 1/scale, then clip_grad_norm_'s g * c);
everything else is the algorithm's.

Full blocks whose param and grad addresses are 16-byte aligned load and store without a mask and
with alignment hints, which keeps 16-byte vector accesses (a mask against a tensor end read from
memory has no provable alignment, and Triton then emits 4-byte ones); the rest take the masked
path. On found_inf the kernel branches out before touching anything: a skip factor would turn
0 * NaN into NaN in the state.
"""
import torch
import triton
import triton.language as tl

from .algorithms import REGISTRY
from .layout import (BLOCK, CLIP_COEF, FOUND_INF, GRAD_ADDR, GROUP, HYPER_COLUMNS, INT8_GROUP,
                     INT8_MIN_SCALE, INT8_SIGNED_MANTISSA, INT8_SPLIT, INT8_SQRT_MANTISSA,
                     INT8_TOP_EXPONENT, INV_SCALE, NUMEL, PARAM_ADDR, STATE_ALIGN, STATE_START,
                     block_owner)
from .math import INTERPRETED


@triton.jit
def _load(ptr, offsets, mask, MASKED: tl.constexpr):
    if MASKED:
        return tl.load(ptr + offsets, mask=mask, other=0.0)
    else:
        return tl.load(ptr + offsets)


@triton.jit
def _store(ptr, offsets, value, mask, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptr + offsets, value, mask=mask)
    else:
        tl.store(ptr + offsets, value)


@triton.jit
def _combine_master(p, remainder, MASTER_BITS: tl.constexpr):
    """The fp32 master of a bf16 param (loaded as fp32) and its remainder: the param's bits plus
    the remainder sign-extended (fusedopt/engine/master.py, combine)."""
    if MASTER_BITS == 32:
        offset = remainder.to(tl.int32)
    else:
        offset = remainder.to(tl.int8, bitcast=True).to(tl.int32) << 8
    return (p.to(tl.int32, bitcast=True) + offset).to(tl.float32, bitcast=True)


@triton.jit
def _split_master(master, MASTER_BITS: tl.constexpr):
    """(bf16 param, remainder) of an fp32 master: fusedopt/engine/master.py, split (bf16 to
    nearest with ties away from zero, which the remainder can be decoded against)."""
    x = master.to(tl.int32, bitcast=True)
    if MASTER_BITS == 24:
        x = (x + 0x80) & -0x100
    param = ((x + 0x8000) >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
    if MASTER_BITS == 32:
        remainder = x.to(tl.int16)
    else:
        remainder = (x >> 8).to(tl.uint8)
    return param, remainder


@triton.jit
def _hash32(step, index):
    """32 random bits per element: fusedopt/engine/stochastic.py, hash32 (uint32 wraps). One
    hash serves both states: state1 rounds with its low 16 bits, state2 with its high 16."""
    h = index.to(tl.uint32) * 0x9E3779B1
    h = h ^ (step.to(tl.uint32) * 0x85EBCA77)
    h = h ^ (h >> 16)
    h = h * 0x7FEB352D
    h = h ^ (h >> 15)
    h = h * 0x846CA68B
    return h ^ (h >> 16)


@triton.jit
def _random16(h, STREAM: tl.constexpr):
    """State STREAM's 16 random bits of the element's hash: fusedopt/engine/stochastic.py,
    random16."""
    if STREAM == 1:
        return h & 0xFFFF
    else:
        return h >> 16


@triton.jit
def _stochastic_bf16(value, random16):
    """fp32 -> bf16, rounded stochastically: fusedopt/engine/stochastic.py, to_bf16."""
    bits = value.to(tl.uint32, bitcast=True) + random16
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _per_element(group_value):
    """A chunk's per-group values [groups] broadcast to its elements [groups * INT8_GROUP]."""
    groups: tl.constexpr = group_value.shape[0]
    return tl.reshape(tl.broadcast_to(group_value[:, None], [groups, INT8_GROUP]),
                      [groups * INT8_GROUP])


@triton.jit
def _power_of_two(exponent, zero):
    """fp32 2^exponent (normal range) per group, 0 for a group stored as zeros."""
    return tl.where(zero, 0.0, ((exponent + 127) << 23).to(tl.float32, bitcast=True))


@triton.jit
def _decode8(codes, scale, SQRT: tl.constexpr):
    """fp32 values of a chunk's 8-bit codes and its groups' scale bytes:
    fusedopt/engine/int8.py, decode (the code's bits in an fp32's place, times 2^(s - 7))."""
    mantissa: tl.constexpr = INT8_SQRT_MANTISSA if SQRT else INT8_SIGNED_MANTISSA
    s = scale.to(tl.int32)
    factor = _per_element(_power_of_two(s - INT8_TOP_EXPONENT - INT8_SPLIT, s == 0))
    if SQRT:
        bits = codes.to(tl.int32) << (23 - mantissa)
    else:
        # Sign-extended, the code's sign bit fills bits 31 to 30 - mantissa once shifted: the
        # mask keeps bit 31 and the 7 magnitude bits below.
        signed = codes.to(tl.int8, bitcast=True).to(tl.int32) << (23 - mantissa)
        bits = signed & ((tl.constexpr(0x7F) << (23 - mantissa)) | -0x80000000)
    value = (bits.to(tl.float32, bitcast=True) * (2.0 ** INT8_SPLIT)) * factor
    if SQRT:
        value = value * value
    return value


@triton.jit
def _encode8(value, random16, mask, SQRT: tl.constexpr, MASKED: tl.constexpr):
    """(codes, group scale bytes) of a chunk's fp32 values, rounded stochastically with 16 random
    bits per element: fusedopt/engine/int8.py, quantize (each value times 2^(7 - s), its fp32
    bits less the dropped ones)."""
    mantissa: tl.constexpr = INT8_SQRT_MANTISSA if SQRT else INT8_SIGNED_MANTISSA
    dropped: tl.constexpr = 23 - mantissa
    x = value
    if SQRT:
        x = tl.sqrt_rn(value)
    magnitude = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    if MASKED:
        magnitude = tl.where(mask, magnitude, 0)
    groups: tl.constexpr = magnitude.shape[0] // INT8_GROUP
    largest = tl.max(tl.reshape(magnitude, [groups, INT8_GROUP]), axis=1)
    scale = (largest + ((tl.constexpr(1) << dropped) - 1)) >> 23
    zero = scale < INT8_MIN_SCALE
    scale = tl.where(zero, 0, scale)
    inverse = _per_element(_power_of_two(-(scale - INT8_TOP_EXPONENT - INT8_SPLIT), zero))
    bits = ((x * inverse) * (2.0 ** -INT8_SPLIT)).to(tl.int32, bitcast=True)
    code = ((bits & 0x7FFFFFFF) + (random16.to(tl.int32) << (dropped - 16))) >> dropped
    if SQRT:
        code = tl.maximum(code, (x != 0).to(tl.int32))
    else:
        code = code | ((bits >> 24) & 0x80)
    return code.to(tl.uint8), scale.to(tl.uint8)


@triton.jit
def _load_state(ptr, scale_ptr, offsets, mask, group_mask, SQRT: tl.constexpr,
                STATE_INT8: tl.constexpr, MASKED: tl.constexpr):
    """A state as fp32: widened from fp32 / bf16 storage, or decoded from 8-bit codes."""
    value = _load(ptr, offsets, mask, MASKED)
    if STATE_INT8:
        groups = tl.arange(0, offsets.shape[0] // INT8_GROUP)
        scale = _load(scale_ptr, groups, group_mask, MASKED)
        return _decode8(value, scale, SQRT)
    else:
        return value.to(tl.float32)


@triton.jit
def _store_state(ptr, scale_ptr, offsets, value, mask, group_mask, random16, SQRT: tl.constexpr,
                 STATE_BF16: tl.constexpr, STATE_INT8: tl.constexpr, MASKED: tl.constexpr):
    if STATE_INT8:
        codes, scales = _encode8(value, random16, mask, SQRT, MASKED)
        _store(ptr, offsets, codes, mask, MASKED)
        _store(scale_ptr, tl.arange(0, offsets.shape[0] // INT8_GROUP), scales, group_mask,
               MASKED)
    else:
        if STATE_BF16:
            value = _stochastic_bf16(value, random16)
        _store(ptr, offsets, value, mask, MASKED)


@triton.jit
def _store_partials(stats_ptr, stride, pid, c0, c1, c2, c3, c4, c5, NUM_STATS: tl.constexpr):
    tl.store(stats_ptr + pid, c0)
    tl.store(stats_ptr + stride + pid, c1)
    tl.store(stats_ptr + 2 * stride + pid, c2)
    if NUM_STATS > 3:
        tl.store(stats_ptr + 3 * stride + pid, c3)
        tl.store(stats_ptr + 4 * stride + pid, c4)
        tl.store(stats_ptr + 5 * stride + pid, c5)


@triton.jit
def _neutral(OPS: tl.constexpr, COLUMN: tl.constexpr):
    """The partial of a block without elements for column COLUMN's op (OPS: 2 bits a column,
    0 sum, 1 min, 2 max): 0, +inf or -inf."""
    op: tl.constexpr = (OPS >> (2 * COLUMN)) & 3
    value = 0.0
    if op == 1:
        value = float("inf")
    elif op == 2:
        value = float("-inf")
    return value


@triton.jit
def _accumulate(total, value, OPS: tl.constexpr, COLUMN: tl.constexpr):
    """Column COLUMN's running per-element statistic merged with a chunk's operands."""
    op: tl.constexpr = (OPS >> (2 * COLUMN)) & 3
    result = total + value
    if op == 1:
        result = tl.minimum(total, value)
    elif op == 2:
        result = tl.maximum(total, value)
    return result


@triton.jit
def _neutral_columns(CHUNK: tl.constexpr, OPS: tl.constexpr):
    """Six per-element running statistics at their columns' neutral values."""
    start = tl.zeros([CHUNK], dtype=tl.float32)
    return (start + _neutral(OPS, 0), start + _neutral(OPS, 1), start + _neutral(OPS, 2),
            start + _neutral(OPS, 3), start + _neutral(OPS, 4), start + _neutral(OPS, 5))


@triton.jit
def _accumulate_columns(a0, a1, a2, a3, a4, a5, t0, t1, t2, t3, t4, t5, NUM_STATS: tl.constexpr,
                        OPS: tl.constexpr):
    """The running statistics merged with a chunk's per-element operands, column by column."""
    a0 = _accumulate(a0, t0, OPS, 0)
    a1 = _accumulate(a1, t1, OPS, 1)
    a2 = _accumulate(a2, t2, OPS, 2)
    if NUM_STATS > 3:
        a3 = _accumulate(a3, t3, OPS, 3)
        a4 = _accumulate(a4, t4, OPS, 4)
        a5 = _accumulate(a5, t5, OPS, 5)
    return a0, a1, a2, a3, a4, a5


@triton.jit
def _reduce_column(total, OPS: tl.constexpr, COLUMN: tl.constexpr):
    op: tl.constexpr = (OPS >> (2 * COLUMN)) & 3
    result = tl.sum(total, axis=0)
    if op == 1:
        result = tl.min(total, axis=0)
    elif op == 2:
        result = tl.max(total, axis=0)
    return result


@triton.jit
def _reduce_block(a0, a1, a2, a3, a4, a5, ALGO_REDUCE: tl.constexpr, NUM_STATS: tl.constexpr,
                  OPS: tl.constexpr):
    """A block's statistics from their per-element running values: compiled, the algorithm's
    one reduction of all its columns; interpreted, one column at a time (the interpreter runs a
    tl.reduce's combine element by element, math.INTERPRETED)."""
    if INTERPRETED:
        c3, c4, c5 = 0.0, 0.0, 0.0
        c0, c1, c2 = (_reduce_column(a0, OPS, 0), _reduce_column(a1, OPS, 1),
                      _reduce_column(a2, OPS, 2))
        if NUM_STATS > 3:
            c3, c4, c5 = (_reduce_column(a3, OPS, 3), _reduce_column(a4, OPS, 4),
                          _reduce_column(a5, OPS, 5))
    else:
        c0, c1, c2, c3, c4, c5 = ALGO_REDUCE(a0, a1, a2, a3, a4, a5)
    return c0, c1, c2, c3, c4, c5


@triton.jit
def _load_master_and_states(param, state1, state2, scale1, scale2, remainder, offsets, mask,
                            group_mask, uses_state, NUM_STATES: tl.constexpr,
                            MASTER_BITS: tl.constexpr, STATE_INT8: tl.constexpr,
                            SQRT1: tl.constexpr, SQRT2: tl.constexpr, MASKED: tl.constexpr):
    """A chunk's fp32 params (the masters, with a remainder) and fp32 states (zeros for a group
    that keeps none), as the update and a skipped step's statistics read them."""
    p = _load(param, offsets, mask, MASKED).to(tl.float32)
    if MASTER_BITS > 0:
        p = _combine_master(p, _load(remainder, offsets, mask, MASKED), MASTER_BITS)
    s1 = tl.zeros(offsets.shape, dtype=tl.float32)
    s2 = tl.zeros(offsets.shape, dtype=tl.float32)
    if uses_state:
        s1 = _load_state(state1, scale1, offsets, mask, group_mask, SQRT1, STATE_INT8, MASKED)
        if NUM_STATES > 1:
            s2 = _load_state(state2, scale2, offsets, mask, group_mask, SQRT2, STATE_INT8,
                             MASKED)
    return p, s1, s2


@triton.jit
def _step_chunk(param, grad, state1, state2, scale1, scale2, remainder, state_element, offsets,
                mask, group_mask, uses_state, k, step, inv_scale, clip_coef,
                ALGO_UPDATE: tl.constexpr, NUM_STATES: tl.constexpr, DTYPE: tl.constexpr,
                MASTER_BITS: tl.constexpr, STATE_BF16: tl.constexpr, STATE_INT8: tl.constexpr,
                SQRT1: tl.constexpr, SQRT2: tl.constexpr, STATS: tl.constexpr,
                MASKED: tl.constexpr):
    """One chunk of a block, updated in place; returns its statistics' per-element operands."""
    p, s1, s2 = _load_master_and_states(param, state1, state2, scale1, scale2, remainder,
                                        offsets, mask, group_mask, uses_state, NUM_STATES,
                                        MASTER_BITS, STATE_INT8, SQRT1, SQRT2, MASKED)
    g = _load(grad, offsets, mask, MASKED).to(tl.float32)
    g = g * inv_scale * clip_coef
    # With master weights the update stays in fp32 (no rounding to the param's dtype): the
    # split below keeps it whole (32 bits) or rounds it to 24.
    p_new, s1, s2, c0, c1, c2, c3, c4, c5 = ALGO_UPDATE(
        p, g, s1, s2, k, mask, tl.float32 if MASTER_BITS > 0 else DTYPE, MASKED, STATS,
        STATE_INT8)
    if uses_state:
        h = tl.zeros(offsets.shape, dtype=tl.uint32)
        if STATE_BF16 or STATE_INT8:
            h = _hash32(step, state_element + offsets)
        if NUM_STATES > 1:
            _store_state(state2, scale2, offsets, s2, mask, group_mask, _random16(h, 2), SQRT2,
                         STATE_BF16, STATE_INT8, MASKED)
        _store_state(state1, scale1, offsets, s1, mask, group_mask, _random16(h, 1), SQRT1,
                     STATE_BF16, STATE_INT8, MASKED)
    if MASTER_BITS > 0:
        p_store, r_new = _split_master(p_new, MASTER_BITS)
        _store(param, offsets, p_store, mask, MASKED)
        _store(remainder, offsets, r_new, mask, MASKED)
    else:
        _store(param, offsets, p_new, mask, MASKED)
    return c0, c1, c2, c3, c4, c5


@triton.jit
def _step_block(param, grad, state1, state2, scale1, scale2, remainder, state_element, limit,
                row, step, pid, globals_ptr, stats_ptr, stats_stride,
                ALGO_COEFFICIENTS: tl.constexpr, ALGO_UPDATE: tl.constexpr,
                ALGO_REDUCE: tl.constexpr, ALGO_USES_STATE: tl.constexpr,
                NUM_STATES: tl.constexpr, NUM_STATS: tl.constexpr, STAT_OPS: tl.constexpr,
                DTYPE: tl.constexpr, MASTER_BITS: tl.constexpr, STATE_BF16: tl.constexpr,
                STATE_INT8: tl.constexpr, SQRT1: tl.constexpr,
                SQRT2: tl.constexpr, STATS: tl.constexpr, MASKED: tl.constexpr,
                CHUNK: tl.constexpr, STAGES: tl.constexpr):
    """A block of BLOCK elements (`limit` of them in the tensor) in chunks of CHUNK, one after
    the other: a chunk's elements are all a thread holds live, so fewer registers per thread
    let more warps share an SM and hide each other's latencies. With STAGES > 1 Triton's
    pipeliner issues the loads of the next STAGES - 1 chunks (asynchronous copies into shared
    memory, no registers) before a chunk is computed. The step's scalars are formed once,
    before the chunks. Statistics of full blocks run per element across the chunks (each
    column's running sum, min or max) and are reduced once, at the block's end: a reduction per
    chunk costs a round through shared memory each time. Masked blocks (tensor tails, unaligned
    tensors: rare) reduce each chunk and keep scalars, which holds their registers down, and
    registers are allocated for the whole kernel (sm_90, fp32 params: 113 a thread against 157
    with per-element running values in both paths; 80 for the full blocks' path alone)."""
    k = ALGO_COEFFICIENTS(row, step)
    uses_state = ALGO_USES_STATE(row)
    # Loaded once here: in the loop the pipeliner would copy them through shared memory every
    # chunk (the stores in the loop may alias them, so nothing hoists them).
    inv_scale = tl.load(globals_ptr + INV_SCALE)
    clip_coef = tl.load(globals_ptr + CLIP_COEF)
    offsets = tl.arange(0, CHUNK)
    if MASKED:
        a0, a1, a2 = _neutral(STAT_OPS, 0), _neutral(STAT_OPS, 1), _neutral(STAT_OPS, 2)
        a3, a4, a5 = _neutral(STAT_OPS, 3), _neutral(STAT_OPS, 4), _neutral(STAT_OPS, 5)
    else:
        a0, a1, a2, a3, a4, a5 = _neutral_columns(CHUNK, STAT_OPS)
    for start in tl.range(0, BLOCK, CHUNK, num_stages=STAGES):
        start = tl.multiple_of(start, CHUNK)
        mask = offsets < limit - start
        group_mask = tl.arange(0, CHUNK // INT8_GROUP) * INT8_GROUP < limit - start
        t0, t1, t2, t3, t4, t5 = _step_chunk(
            param + start, grad + start, state1 + start, state2 + start,
            scale1 + start // INT8_GROUP, scale2 + start // INT8_GROUP, remainder + start,
            state_element + start, offsets, mask, group_mask, uses_state, k, step, inv_scale,
            clip_coef, ALGO_UPDATE, NUM_STATES, DTYPE, MASTER_BITS, STATE_BF16, STATE_INT8, SQRT1,
            SQRT2, STATS, MASKED)
        if STATS:
            if MASKED:
                t0, t1, t2, t3, t4, t5 = _reduce_block(t0, t1, t2, t3, t4, t5, ALGO_REDUCE,
                                                       NUM_STATS, STAT_OPS)
            a0, a1, a2, a3, a4, a5 = _accumulate_columns(a0, a1, a2, a3, a4, a5, t0, t1, t2, t3,
                                                         t4, t5, NUM_STATS, STAT_OPS)
    if STATS:
        c0, c1, c2, c3, c4, c5 = a0, a1, a2, a3, a4, a5
        if not MASKED:
            c0, c1, c2, c3, c4, c5 = _reduce_block(a0, a1, a2, a3, a4, a5, ALGO_REDUCE,
                                                   NUM_STATS, STAT_OPS)
        _store_partials(stats_ptr, stats_stride, pid, c0, c1, c2, c3, c4, c5, NUM_STATS)


@triton.jit
def _observe_block(param, state1, state2, scale1, scale2, remainder, limit, row, step, pid,
                   stats_ptr, stats_stride, ALGO_OBSERVE: tl.constexpr,
                   ALGO_REDUCE: tl.constexpr, ALGO_USES_STATE: tl.constexpr,
                   NUM_STATES: tl.constexpr, NUM_STATS: tl.constexpr, STAT_OPS: tl.constexpr,
                   MASTER_BITS: tl.constexpr, STATE_INT8: tl.constexpr, SQRT1: tl.constexpr,
                   SQRT2: tl.constexpr, CHUNK: tl.constexpr):
    """A skipped step's statistics of a block (the unchanged state), in chunks like the update:
    registers are allocated for the whole kernel, so a block-wide path here would cost the
    update's occupancy too."""
    uses_state = ALGO_USES_STATE(row)
    offsets = tl.arange(0, CHUNK)
    a0, a1, a2, a3, a4, a5 = _neutral_columns(CHUNK, STAT_OPS)
    for start in range(0, BLOCK, CHUNK):
        mask = offsets < limit - start
        group_mask = tl.arange(0, CHUNK // INT8_GROUP) * INT8_GROUP < limit - start
        p, s1, s2 = _load_master_and_states(
            param + start, state1 + start, state2 + start, scale1 + start // INT8_GROUP,
            scale2 + start // INT8_GROUP, remainder + start, offsets, mask, group_mask,
            uses_state, NUM_STATES, MASTER_BITS, STATE_INT8, SQRT1, SQRT2, True)
        t0, t1, t2, t3, t4, t5 = ALGO_OBSERVE(p, s1, s2, row, step, mask)
        a0, a1, a2, a3, a4, a5 = _accumulate_columns(a0, a1, a2, a3, a4, a5, t0, t1, t2, t3, t4,
                                                     t5, NUM_STATS, STAT_OPS)
    c0, c1, c2, c3, c4, c5 = _reduce_block(a0, a1, a2, a3, a4, a5, ALGO_REDUCE, NUM_STATS,
                                           STAT_OPS)
    _store_partials(stats_ptr, stats_stride, pid, c0, c1, c2, c3, c4, c5, NUM_STATS)


@triton.jit(do_not_specialize=["num_segment_tensors", "tensor_offset"])
def update_kernel(tensor_block_start_ptr, num_segment_tensors, tensor_offset, table_ptr,
                  num_tensors, state1_ptr, state2_ptr, scale1_ptr,
                  scale2_ptr, remainder_ptr, tensor_step_ptr, hyper_ptr, globals_ptr, stats_ptr,
                  stats_stride, ALGO_COEFFICIENTS: tl.constexpr, ALGO_UPDATE: tl.constexpr,
                  ALGO_REDUCE: tl.constexpr, ALGO_OBSERVE: tl.constexpr,
                  ALGO_USES_STATE: tl.constexpr, NUM_STATES: tl.constexpr,
                  NUM_STATS: tl.constexpr, STAT_OPS: tl.constexpr, DTYPE: tl.constexpr,
                  MASTER_BITS: tl.constexpr, STATE_BF16: tl.constexpr,
                  STATE_INT8: tl.constexpr, SQRT1: tl.constexpr, SQRT2: tl.constexpr,
                  STATS: tl.constexpr, CHUNK: tl.constexpr, STAGES: tl.constexpr):
    pid = tl.program_id(0)
    local = block_owner(tensor_block_start_ptr, num_segment_tensors, pid)
    tensor = (tensor_offset + local).to(tl.int64)
    group = tl.load(table_ptr + GROUP * num_tensors + tensor)
    numel = tl.load(table_ptr + NUMEL * num_tensors + tensor)
    first = tl.multiple_of((pid - tl.load(tensor_block_start_ptr + local)).to(tl.int64) * BLOCK,
                           BLOCK)
    # A multiple of STATE_ALIGN (the segment's layout): the hint keeps the state loads vectorized.
    state_element = tl.multiple_of(tl.load(table_ptr + STATE_START * num_tensors + tensor) + first,
                                   STATE_ALIGN)
    param_addr = tl.load(table_ptr + PARAM_ADDR * num_tensors + tensor)
    grad_addr = tl.load(table_ptr + GRAD_ADDR * num_tensors + tensor)
    state1 = state1_ptr + state_element
    state2 = state2_ptr + state_element
    # 8-bit state: the scale bytes of the block's groups of INT8_GROUP elements.
    scale1 = scale1_ptr + state_element // INT8_GROUP
    scale2 = scale2_ptr + state_element // INT8_GROUP
    remainder = remainder_ptr + state_element
    row = hyper_ptr + group * HYPER_COLUMNS
    step = tl.load(tensor_step_ptr + tensor).to(tl.int32)
    if group < 0:
        if STATS:
            _store_partials(stats_ptr, stats_stride, pid, _neutral(STAT_OPS, 0),
                            _neutral(STAT_OPS, 1), _neutral(STAT_OPS, 2), _neutral(STAT_OPS, 3),
                            _neutral(STAT_OPS, 4), _neutral(STAT_OPS, 5), NUM_STATS)
    elif tl.load(globals_ptr + FOUND_INF) != 0:
        if STATS:
            # A skipped step reports the unchanged state.
            _observe_block(param_addr.to(tl.pointer_type(DTYPE)) + first, state1, state2, scale1,
                           scale2, remainder, numel - first, row, step, pid, stats_ptr,
                           stats_stride, ALGO_OBSERVE, ALGO_REDUCE, ALGO_USES_STATE, NUM_STATES,
                           NUM_STATS, STAT_OPS, MASTER_BITS, STATE_INT8, SQRT1, SQRT2, CHUNK)
    elif (first + BLOCK <= numel) & (param_addr % 16 == 0) & (grad_addr % 16 == 0):
        param = tl.multiple_of(param_addr.to(tl.pointer_type(DTYPE)), 16) + first
        grad = tl.multiple_of(grad_addr.to(tl.pointer_type(DTYPE)), 16) + first
        _step_block(param, grad, state1, state2, scale1, scale2, remainder, state_element,
                    numel - first, row, step, pid, globals_ptr, stats_ptr, stats_stride,
                    ALGO_COEFFICIENTS, ALGO_UPDATE, ALGO_REDUCE, ALGO_USES_STATE, NUM_STATES,
                    NUM_STATS, STAT_OPS, DTYPE, MASTER_BITS, STATE_BF16, STATE_INT8, SQRT1,
                    SQRT2, STATS, False, CHUNK, STAGES)
    else:
        param = param_addr.to(tl.pointer_type(DTYPE)) + first
        grad = grad_addr.to(tl.pointer_type(DTYPE)) + first
        _step_block(param, grad, state1, state2, scale1, scale2, remainder, state_element,
                    numel - first, row, step, pid, globals_ptr, stats_ptr, stats_stride,
                    ALGO_COEFFICIENTS, ALGO_UPDATE, ALGO_REDUCE, ALGO_USES_STATE, NUM_STATES,
                    NUM_STATS, STAT_OPS, DTYPE, MASTER_BITS, STATE_BF16, STATE_INT8, SQRT1,
                    SQRT2, STATS, True, CHUNK, STAGES)


# 4 warps: 10.28 ms at 1.1B fp32 on the H100 against 11.76 ms with 8 and 11.12 ms with 16 (one
# 4096-element pass a program, triton.testing.do_bench medians). Chunks of 512 (4 elements a thread
# at a time, 44-71 registers against 160-255): at 1.1B bf16 on an H200 the (24, int8) step takes
# 6.71 ms against 8.19 ms in one pass, (24, bf16) 5.39 against 7.13, (32, fp32) 7.73 against 8.48,
# and fp32 params 8.46 against 8.66 (1024: 8.39; 256 is slower in every mode). Statistics reduced
# per chunk through shared memory cost 23% at 1.1B fp32 (10.43 against 8.45 ms), hence the
# per-element running values (_step_block). Loads pipelined 3 chunks deep (H200, 1.1B, one run
# against the unpipelined loop): bf16 params (24, int8) 6.77 -> 6.69 ms, (24, bf16) 5.39 -> 5.14,
# (32, bf16) 5.70 -> 5.56, fp32 state 6.66 -> 6.58, fp32 params 8.44 -> 8.40; 2 stages are slower
# than none in every mode (int8 7.59), and so is prefetching the next chunk into registers by hand
# (int8 7.59, 128 registers a thread against 96). 4 stages against 3 (another run): fp32 params
# 8.41 -> 8.31, the rest within 1%.
UPDATE_WARPS = 4
UPDATE_CHUNK = 512
UPDATE_STAGES = 4
# Launches without statistics are capped at 72 registers: the other modes measured the same with
# the cap as without (within 0.5%), and it holds them at 70-72 registers, no spills, where the
# step's scalars loaded once a block (_step_block) would take 80-94 (offline sm_90).
UPDATE_MAXNREG = 72
# 8-bit state's update is bound by instruction issue (Nsight Compute at 4 warps, 512-element
# chunks, 72 registers: 0.88 warp instructions issued per scheduler cycle, 130 an element), so
# its launch spends fewer of them on each block's prologue (the step's scalars in fp64, the
# pipeline's first loads), which every warp of a program runs: one warp a program, chunks of 256
# (8 elements a thread at a time, 96 registers, no spills). H200, 1.1B, (24, int8), one run
# of each: 4 warps x 512 at 72 registers 5.74-5.78 ms; 2 x 256 at 72 5.44; 2 x 512 at 96 5.12;
# 1 x 256 at 96 4.95-4.98 (88: 5.09, 104: 5.06; 3 or 5 stages the same); 1 x 512 at 128 5.35.
# The other modes are bound by DRAM and gain nothing from it (1 x 256: fp32 params 8.57 against
# 8.30 ms, (24, bf16) 5.06 against 5.04). With statistics (190 registers uncapped) the cap is
# 160, the fewest without spills (offline sm_90): 6.84 -> 5.84 ms (128 spills: 6.16; 4 warps x
# 512 uncapped: 8.38).
INT8_UPDATE_WARPS = 1
INT8_UPDATE_CHUNK = 256
INT8_UPDATE_MAXNREG = 96
INT8_UPDATE_STATS_MAXNREG = 160

_TRITON_DTYPES = {"torch.float32": tl.float32, "torch.bfloat16": tl.bfloat16,
                  "torch.float16": tl.float16}


def triton_dtype(dtype):
    return _TRITON_DTYPES[str(dtype)]


def update(algorithm, dtype, tensor_block_start, num_blocks, tensor_offset, tensor_table, state1,
           state2, tensor_step, hyper, globals_, stats_partials, remainder=None, master_bits=0,
           scale1=None, scale2=None):
    """One step of `algorithm` over the num_blocks blocks of a segment whose tensors start at
    tensor_block_start (its tensor i is the table's column tensor_offset + i); see
    docs/kernel_contract.md. `remainder` (int16 for master_bits 32, uint8 for 24; bf16 params
    only) holds the master weights' low bits, addressed like the state
    (fusedopt/engine/master.py). state1 / state2 are fp32, bf16, or uint8 codes of 8-bit state
    with their group scale bytes scale1 / scale2 (fusedopt/engine/int8.py)."""
    math = REGISTRY[algorithm]
    stats = stats_partials is not None
    if num_blocks == 0:
        return
    codes = tuple(math.STATE_CODES) + ("signed",) * (2 - len(math.STATE_CODES))
    int8 = scale1 is not None
    if int8:
        warps, chunk = INT8_UPDATE_WARPS, INT8_UPDATE_CHUNK
        maxnreg = INT8_UPDATE_STATS_MAXNREG if stats else INT8_UPDATE_MAXNREG
    else:
        warps, chunk, maxnreg = UPDATE_WARPS, UPDATE_CHUNK, None if stats else UPDATE_MAXNREG
    update_kernel[(num_blocks,)](
        tensor_block_start, tensor_block_start.numel() - 1, tensor_offset, tensor_table,
        tensor_table.shape[1], state1,
        state2 if state2 is not None else state1,
        scale1 if scale1 is not None else state1,
        scale2 if scale2 is not None else (scale1 if scale1 is not None else state1),
        remainder if remainder is not None else state1, tensor_step, hyper, globals_,
        stats_partials if stats else globals_, stats_partials.stride(0) if stats else 0,
        ALGO_COEFFICIENTS=math.coefficients, ALGO_UPDATE=math.update,
        ALGO_REDUCE=math.reduce_statistics, ALGO_OBSERVE=math.observe,
        ALGO_USES_STATE=math.uses_state,
        NUM_STATES=math.NUM_STATES, NUM_STATS=math.NUM_STATS, STAT_OPS=math.STAT_OPS,
        DTYPE=triton_dtype(dtype), MASTER_BITS=master_bits if remainder is not None else 0,
        STATE_BF16=state1.dtype == torch.bfloat16, STATE_INT8=int8,
        SQRT1=codes[0] == "sqrt", SQRT2=codes[1] == "sqrt",
        STATS=stats, CHUNK=chunk, STAGES=UPDATE_STAGES, num_warps=warps,
        **({} if maxnreg is None else {"maxnreg": maxnreg}))
