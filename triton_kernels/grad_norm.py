"""grad_norm: the read-only pass over the gradients.

Per BLOCK of 4096 elements: the sum of (grad / scale)^2 in fp32 and a non-finite flag.
Bytes: reads the gradient once (4 B/elem fp32, 2 B/elem bf16/fp16), writes 8 B per block.
Unscaling multiplies by 1/scale as torch.amp.GradScaler.unscale_ does, so the norm is the
norm of exactly the values the update kernel will use.
"""
import triton
import triton.language as tl

from fusedopt.flat import BLOCK


@triton.jit
def grad_norm_kernel(grad_ptr, block_tensor_ptr, tensor_end_ptr, tensor_group_ptr, scale_ptr,
                     sums_ptr, num_blocks, HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    tensor = tl.load(block_tensor_ptr + pid)
    # A tensor without a gradient (group -1) reads nothing: its end moves to 0.
    end = tl.where(tl.load(tensor_group_ptr + tensor) >= 0, tl.load(tensor_end_ptr + tensor), 0)
    start = pid.to(tl.int64) * BLOCK
    offsets = start + tl.arange(0, BLOCK)
    # Full blocks load without a mask: a mask against a tensor end loaded from memory has no
    # known alignment, and Triton then falls back to 4-byte loads (seen in the PTX).
    if start + BLOCK <= end:
        g = tl.load(grad_ptr + offsets).to(tl.float32)
    else:
        g = tl.load(grad_ptr + offsets, mask=offsets < end, other=0.0).to(tl.float32)
    if HAS_SCALE:
        g = g * (1.0 / tl.load(scale_ptr))
    nonfinite = (g != g) | (tl.abs(g) == float("inf"))
    tl.store(sums_ptr + pid, tl.sum(g * g, axis=0))
    tl.store(sums_ptr + num_blocks + pid, tl.max(nonfinite.to(tl.float32), axis=0))


def grad_norm(grad, block_tensor, tensor_end, tensor_group, scale, block_sums):
    """Write block_sums[0, b] = sum of (grad/scale)^2 and block_sums[1, b] = non-finite flag."""
    num_blocks = block_tensor.numel()
    grad_norm_kernel[(num_blocks,)](
        grad, block_tensor, tensor_end, tensor_group, scale if scale is not None else block_sums,
        block_sums, num_blocks, HAS_SCALE=scale is not None, BLOCK=BLOCK, num_warps=8)
