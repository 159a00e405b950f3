"""grad_norm: the read-only pass over the gradients, where their owners keep them.

Per BLOCK of 4096 elements of a segment: the sum of (grad / scale)^2 in fp32 and a non-finite
flag. Bytes: reads the gradient once (4 B/elem fp32, 2 B/elem bf16/fp16), writes 8 B per block;
each program finds its tensor by a search over the segment's tensor_block_start (L1-resident).
Unscaling multiplies by 1/scale as torch.amp.GradScaler.unscale_ does, so the norm is the norm
of exactly the values the update kernel will use.
"""
import triton
import triton.language as tl

from .layout import BLOCK, GRAD_ADDR, GROUP, NUMEL, block_owner
from .update import triton_dtype


@triton.jit(do_not_specialize=["num_segment_tensors", "tensor_offset"])
def grad_norm_kernel(tensor_block_start_ptr, num_segment_tensors, tensor_offset, table_ptr,
                     num_tensors, scale_ptr, sums_ptr, sums_stride, HAS_SCALE: tl.constexpr,
                     DTYPE: tl.constexpr):
    pid = tl.program_id(0)
    local = block_owner(tensor_block_start_ptr, num_segment_tensors, pid)
    tensor = (tensor_offset + local).to(tl.int64)
    offsets = tl.arange(0, BLOCK)
    total = 0.0
    nonfinite = 0.0
    if tl.load(table_ptr + GROUP * num_tensors + tensor) >= 0:
        numel = tl.load(table_ptr + NUMEL * num_tensors + tensor)
        first = tl.multiple_of((pid - tl.load(tensor_block_start_ptr + local)).to(tl.int64)
                               * BLOCK, BLOCK)
        grad_addr = tl.load(table_ptr + GRAD_ADDR * num_tensors + tensor)
        if (first + BLOCK <= numel) & (grad_addr % 16 == 0):
            grad = tl.multiple_of(grad_addr.to(tl.pointer_type(DTYPE)), 16) + first
            g = tl.load(grad + offsets).to(tl.float32)
        else:
            grad = grad_addr.to(tl.pointer_type(DTYPE)) + first
            g = tl.load(grad + offsets, mask=offsets < numel - first, other=0.0).to(tl.float32)
        if HAS_SCALE:
            g = g * (1.0 / tl.load(scale_ptr))
        total = tl.sum(g * g, axis=0)
        nonfinite = tl.max(((g != g) | (tl.abs(g) == float("inf"))).to(tl.float32), axis=0)
    tl.store(sums_ptr + pid, total)
    tl.store(sums_ptr + sums_stride + pid, nonfinite)


# One warp a program: at 1.1B params on an H200 (kernel alone, medians of 8 interleaved rounds)
# bf16 grads read at 3.71 TB/s with 1 warp, against 2.51 / 2.60 / 2.27 TB/s with 2 / 4 / 8
# (0.59 against 0.97 ms with 8); fp32 grads at 4.6 TB/s with any of them. A program's 8 KB of
# bf16 waits on a chain of dependent loads (the tensor search, the table, the grad), and one
# warp holds all 16 of its 16-byte loads per thread in flight at once and reduces them without
# shared memory or a barrier.
GRAD_NORM_WARPS = 1


def grad_norm(dtype, tensor_block_start, num_blocks, tensor_offset, tensor_table, scale,
              block_sums):
    """block_sums[0, b] = sum of (grad/scale)^2 and block_sums[1, b] = the non-finite flag, over
    the num_blocks blocks of a segment whose tensors start at tensor_block_start (its tensor i is
    the table's column tensor_offset + i)."""
    if num_blocks == 0:
        return
    grad_norm_kernel[(num_blocks,)](
        tensor_block_start, tensor_block_start.numel() - 1, tensor_offset, tensor_table,
        tensor_table.shape[1], scale if scale is not None else block_sums, block_sums,
        block_sums.stride(0),
        HAS_SCALE=scale is not None, DTYPE=triton_dtype(dtype), num_warps=GRAD_NORM_WARPS)
