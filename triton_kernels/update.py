"""update: the one traversal kernel of the update; the algorithm's math comes in as constexpr
functions (triton_kernels/algorithms/<name>.py), so unused paths compile away.

One program per BLOCK (4096 elements) of a segment: the program finds its tensor in the tensor
table (docs/kernel_contract.md), reads param and grad where their owners keep them and the state
from the segment's flat buffers, and writes param and state back. g is unscaled and clipped
here, in torch's order (unscale_'s g * 1/scale, then clip_grad_norm_'s g * c); everything else
is the algorithm's.

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
from .layout import (BLOCK, CLIP_COEF, FOUND_INF, GRAD_ADDR, GROUP, HYPER_COLUMNS, INV_SCALE,
                     NUMEL, PARAM_ADDR, BLOCK_START, STATE_ALIGN, STATE_START)


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
    """The fp32 master of a bf16 param (loaded as fp32) and its remainder; the bit operations of
    fusedopt/engine/master.py, combine."""
    p_bits = p.to(tl.int32, bitcast=True)
    if MASTER_BITS == 32:
        low = remainder.to(tl.int32) & 0xFFFF
    else:
        low = remainder.to(tl.int32) << 8
    carry = (low >= 0x8000).to(tl.int32) << 16
    master = (p_bits & -0x80000000) | (((p_bits & 0x7FFF0000) - carry) + low)
    return master.to(tl.float32, bitcast=True)


@triton.jit
def _split_master(master, MASTER_BITS: tl.constexpr):
    """(bf16 param, remainder) of an fp32 master: fusedopt/engine/master.py, split (bf16 to
    nearest with ties away from zero, which the remainder can be decoded against)."""
    bits = master.to(tl.int32, bitcast=True)
    sign = bits & -0x80000000
    magnitude = bits & 0x7FFFFFFF
    if MASTER_BITS == 24:
        magnitude = (magnitude + 0x80) & -0x100
    low = magnitude & 0xFFFF
    carry = (low >= 0x8000).to(tl.int32) << 16
    high = sign | ((magnitude & 0x7FFF0000) + carry)
    param = (high >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
    if MASTER_BITS == 32:
        remainder = (low - ((low >> 15) << 16)).to(tl.int16)
    else:
        remainder = (low >> 8).to(tl.uint8)
    return param, remainder


@triton.jit
def _random16(step, index, STREAM: tl.constexpr):
    """16 random bits per element: fusedopt/engine/stochastic.py, random16 (uint32 wraps)."""
    key: tl.constexpr = (STREAM * 0xC2B2AE3D) & 0xFFFFFFFF
    h = index.to(tl.uint32) * 0x9E3779B1
    h = h ^ (step.to(tl.uint32) * 0x85EBCA77 + key)
    h = h ^ (h >> 16)
    h = h * 0x7FEB352D
    h = h ^ (h >> 15)
    h = h * 0x846CA68B
    h = h ^ (h >> 16)
    return h & 0xFFFF


@triton.jit
def _stochastic_bf16(value, step, index, STREAM: tl.constexpr):
    """fp32 -> bf16, rounded stochastically: fusedopt/engine/stochastic.py, to_bf16."""
    bits = value.to(tl.uint32, bitcast=True) + _random16(step, index, STREAM)
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _store_state(ptr, offsets, value, mask, step, index, STREAM: tl.constexpr,
                 STATE_BF16: tl.constexpr, MASKED: tl.constexpr):
    if STATE_BF16:
        value = _stochastic_bf16(value, step, index, STREAM)
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
def _step_block(param, grad, state1, state2, remainder, state_element, offsets, mask, row, step,
                pid, globals_ptr, stats_ptr, stats_stride, ALGO_UPDATE: tl.constexpr,
                ALGO_USES_STATE: tl.constexpr, NUM_STATES: tl.constexpr, NUM_STATS: tl.constexpr,
                DTYPE: tl.constexpr, MASTER_BITS: tl.constexpr, STATE_BF16: tl.constexpr,
                STATS: tl.constexpr, MASKED: tl.constexpr):
    p = _load(param, offsets, mask, MASKED).to(tl.float32)
    if MASTER_BITS > 0:
        p = _combine_master(p, _load(remainder, offsets, mask, MASKED), MASTER_BITS)
    g = _load(grad, offsets, mask, MASKED).to(tl.float32)
    g = g * tl.load(globals_ptr + INV_SCALE) * tl.load(globals_ptr + CLIP_COEF)
    uses_state = ALGO_USES_STATE(row)
    s1 = tl.zeros([BLOCK], dtype=tl.float32)
    s2 = tl.zeros([BLOCK], dtype=tl.float32)
    if uses_state:
        s1 = _load(state1, offsets, mask, MASKED).to(tl.float32)
        if NUM_STATES > 1:
            s2 = _load(state2, offsets, mask, MASKED).to(tl.float32)
    # With master weights the update stays in fp32 (no rounding to the param's dtype): the
    # split below keeps it whole (32 bits) or rounds it to 24.
    p_new, s1, s2, c0, c1, c2, c3, c4, c5 = ALGO_UPDATE(
        p, g, s1, s2, row, step, mask, tl.float32 if MASTER_BITS > 0 else DTYPE, MASKED, STATS)
    if uses_state:
        index = state_element + offsets
        if NUM_STATES > 1:
            _store_state(state2, offsets, s2, mask, step, index, 2, STATE_BF16, MASKED)
        _store_state(state1, offsets, s1, mask, step, index, 1, STATE_BF16, MASKED)
    if MASTER_BITS > 0:
        p_store, r_new = _split_master(p_new, MASTER_BITS)
        _store(param, offsets, p_store, mask, MASKED)
        _store(remainder, offsets, r_new, mask, MASKED)
    else:
        _store(param, offsets, p_new, mask, MASKED)
    if STATS:
        _store_partials(stats_ptr, stats_stride, pid, c0, c1, c2, c3, c4, c5, NUM_STATS)


@triton.jit
def update_kernel(block_tensor_ptr, table_ptr, num_tensors, state1_ptr, state2_ptr,
                  remainder_ptr, tensor_step_ptr, hyper_ptr, globals_ptr, stats_ptr,
                  stats_stride, ALGO_UPDATE: tl.constexpr, ALGO_OBSERVE: tl.constexpr,
                  ALGO_USES_STATE: tl.constexpr, NUM_STATES: tl.constexpr,
                  NUM_STATS: tl.constexpr, STAT_OPS: tl.constexpr, DTYPE: tl.constexpr,
                  MASTER_BITS: tl.constexpr, STATE_BF16: tl.constexpr, STATS: tl.constexpr):
    pid = tl.program_id(0)
    tensor = tl.load(block_tensor_ptr + pid).to(tl.int64)
    group = tl.load(table_ptr + GROUP * num_tensors + tensor)
    numel = tl.load(table_ptr + NUMEL * num_tensors + tensor)
    # Both starts are multiples of BLOCK, so the tensor-relative start is one too.
    first = tl.multiple_of(pid.to(tl.int64) * BLOCK
                           - tl.load(table_ptr + BLOCK_START * num_tensors + tensor), BLOCK)
    # A multiple of STATE_ALIGN (the segment's layout): the hint keeps the state loads vectorized.
    state_element = tl.multiple_of(tl.load(table_ptr + STATE_START * num_tensors + tensor) + first,
                                   STATE_ALIGN)
    param_addr = tl.load(table_ptr + PARAM_ADDR * num_tensors + tensor)
    grad_addr = tl.load(table_ptr + GRAD_ADDR * num_tensors + tensor)
    offsets = tl.arange(0, BLOCK)
    mask = offsets < numel - first
    state1 = state1_ptr + state_element
    state2 = state2_ptr + state_element
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
            param = param_addr.to(tl.pointer_type(DTYPE)) + first
            p = tl.load(param + offsets, mask=mask, other=0.0).to(tl.float32)
            if MASTER_BITS > 0:
                p = _combine_master(p, tl.load(remainder + offsets, mask=mask, other=0),
                                    MASTER_BITS)
            s1 = tl.zeros([BLOCK], dtype=tl.float32)
            s2 = tl.zeros([BLOCK], dtype=tl.float32)
            if ALGO_USES_STATE(row):
                s1 = tl.load(state1 + offsets, mask=mask, other=0.0).to(tl.float32)
                if NUM_STATES > 1:
                    s2 = tl.load(state2 + offsets, mask=mask, other=0.0).to(tl.float32)
            c0, c1, c2, c3, c4, c5 = ALGO_OBSERVE(p, s1, s2, row, step, mask)
            _store_partials(stats_ptr, stats_stride, pid, c0, c1, c2, c3, c4, c5, NUM_STATS)
    elif (first + BLOCK <= numel) & (param_addr % 16 == 0) & (grad_addr % 16 == 0):
        param = tl.multiple_of(param_addr.to(tl.pointer_type(DTYPE)), 16) + first
        grad = tl.multiple_of(grad_addr.to(tl.pointer_type(DTYPE)), 16) + first
        _step_block(param, grad, state1, state2, remainder, state_element, offsets, mask, row,
                    step, pid, globals_ptr, stats_ptr, stats_stride, ALGO_UPDATE,
                    ALGO_USES_STATE, NUM_STATES, NUM_STATS, DTYPE, MASTER_BITS, STATE_BF16,
                    STATS, False)
    else:
        param = param_addr.to(tl.pointer_type(DTYPE)) + first
        grad = grad_addr.to(tl.pointer_type(DTYPE)) + first
        _step_block(param, grad, state1, state2, remainder, state_element, offsets, mask, row,
                    step, pid, globals_ptr, stats_ptr, stats_stride, ALGO_UPDATE,
                    ALGO_USES_STATE, NUM_STATES, NUM_STATS, DTYPE, MASTER_BITS, STATE_BF16,
                    STATS, True)


_TRITON_DTYPES = {"torch.float32": tl.float32, "torch.bfloat16": tl.bfloat16,
                  "torch.float16": tl.float16}


def triton_dtype(dtype):
    return _TRITON_DTYPES[str(dtype)]


def update(algorithm, dtype, block_tensor, tensor_table, state1, state2, tensor_step, hyper,
           globals_, stats_partials, remainder=None, master_bits=0):
    """One step of `algorithm` over a segment; see docs/kernel_contract.md. `remainder` (int16
    for master_bits 32, uint8 for 24; bf16 params only) holds the master weights' low bits,
    addressed like the state (fusedopt/engine/master.py)."""
    math = REGISTRY[algorithm]
    stats = stats_partials is not None
    num_blocks = block_tensor.numel()
    if num_blocks == 0:
        return
    update_kernel[(num_blocks,)](
        block_tensor, tensor_table, tensor_table.shape[1], state1,
        state2 if state2 is not None else state1,
        remainder if remainder is not None else state1, tensor_step, hyper, globals_,
        stats_partials if stats else globals_, stats_partials.stride(0) if stats else 0,
        ALGO_UPDATE=math.update, ALGO_OBSERVE=math.observe, ALGO_USES_STATE=math.uses_state,
        NUM_STATES=math.NUM_STATES, NUM_STATS=math.NUM_STATS, STAT_OPS=math.STAT_OPS,
        DTYPE=triton_dtype(dtype), MASTER_BITS=master_bits if remainder is not None else 0,
        STATE_BF16=state1.dtype == torch.bfloat16,
        STATS=stats,
        # 4 warps (32 elements a thread): 10.28 ms at 1.1B fp32 on the H100 against 11.76 ms
        # with 8 and 11.12 ms with 16 (triton.testing.do_bench medians, one run).
        num_warps=4)
