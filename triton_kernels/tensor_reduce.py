"""tensor_reduce: per-tensor reductions of per-block partials, in block order.

One program per (tensor, column) walks the tensor's blocks in order, CHUNK at a time, so the
result does not depend on scheduling (no atomics): bit-identical run to run. Sums accumulate in
fp64: a count column can reach 65M for a 32000x2048 embedding, past fp32's exact 2^24.
Traffic is tiny: 4 B per block per column (1 MB per column at 1.1B params).
"""
import triton
import triton.language as tl

CHUNK = 1024


@triton.jit
def tensor_reduce_kernel(values_ptr, values_stride, block_start_ptr, ops_code, out_ptr,
                         out_stride, tensor_offset, CHUNK: tl.constexpr):
    tensor = tl.program_id(0)
    column = tl.program_id(1)
    first = tl.load(block_start_ptr + tensor)
    last = tl.load(block_start_ptr + tensor + 1)
    total = tl.zeros([CHUNK], dtype=tl.float64)
    lowest = tl.full([CHUNK], float("inf"), dtype=tl.float32)
    highest = tl.full([CHUNK], float("-inf"), dtype=tl.float32)
    row = values_ptr + column.to(tl.int64) * values_stride
    for start in range(first, last, CHUNK):
        offsets = start + tl.arange(0, CHUNK)
        mask = offsets < last
        x = tl.load(row + offsets, mask=mask, other=0.0)
        total += x.to(tl.float64)
        lowest = tl.minimum(lowest, tl.where(mask, x, float("inf")))
        highest = tl.maximum(highest, tl.where(mask, x, float("-inf")))
    op = (ops_code >> (2 * column)) & 3
    result = tl.where(op == 0, tl.sum(total, axis=0).to(tl.float32),
                      tl.where(op == 1, tl.min(lowest, axis=0), tl.max(highest, axis=0)))
    tl.store(out_ptr + column * out_stride + tensor_offset + tensor, result)


def tensor_reduce(block_values, tensor_block_start, ops, out, tensor_offset):
    """out[c, tensor_offset + i] = reduction ops[c] (0 sum, 1 min, 2 max) of tensor i's blocks."""
    num_tensors = tensor_block_start.numel() - 1
    if num_tensors == 0:
        return
    ops_code = sum(op << (2 * c) for c, op in enumerate(ops))
    tensor_reduce_kernel[(num_tensors, len(ops))](
        block_values, block_values.stride(0), tensor_block_start, ops_code, out, out.stride(0),
        tensor_offset, CHUNK=CHUNK, num_warps=4)
