"""grad_norm: the read-only pass over the gradients, where their owners keep them.

Per BLOCK of 4096 elements of a segment: the sum of (grad / scale)^2 in fp32 and a non-finite
flag. Bytes: reads the gradient once (4 B/elem fp32, 2 B/elem bf16/fp16), writes 8 B per block.
Unscaling multiplies by 1/scale as torch.amp.GradScaler.unscale_ does, so the norm is the norm
of exactly the values the update kernel will use.
"""
import triton
import triton.language as tl

from .layout import BLOCK, GRAD_ADDR, GROUP, NUMEL, BLOCK_START
from .update import triton_dtype


@triton.jit
def grad_norm_kernel(block_tensor_ptr, table_ptr, num_tensors, scale_ptr, sums_ptr, sums_stride,
                     HAS_SCALE: tl.constexpr, DTYPE: tl.constexpr):
    pid = tl.program_id(0)
    tensor = tl.load(block_tensor_ptr + pid).to(tl.int64)
    offsets = tl.arange(0, BLOCK)
    total = 0.0
    nonfinite = 0.0
    if tl.load(table_ptr + GROUP * num_tensors + tensor) >= 0:
        numel = tl.load(table_ptr + NUMEL * num_tensors + tensor)
        first = tl.multiple_of(pid.to(tl.int64) * BLOCK
                               - tl.load(table_ptr + BLOCK_START * num_tensors + tensor), BLOCK)
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


def grad_norm(dtype, block_tensor, tensor_table, scale, block_sums):
    """block_sums[0, b] = sum of (grad/scale)^2 and block_sums[1, b] = the non-finite flag."""
    num_blocks = block_tensor.numel()
    if num_blocks == 0:
        return
    grad_norm_kernel[(num_blocks,)](
        block_tensor, tensor_table, tensor_table.shape[1],
        scale if scale is not None else block_sums, block_sums, block_sums.stride(0),
        HAS_SCALE=scale is not None, DTYPE=triton_dtype(dtype), num_warps=8)
