"""finalize: the tiny single-program kernel between the gradient reduction and the update.

Global gradient norm (fp64 sum over tensors in tensor order), clip coefficient as
clip_grad_norm_ computes it, found_inf, step counts, skipped-step count and the dynamic loss
scale (torch._amp_update_scale_'s rule). Reads 8 B and writes 4 B per tensor: microseconds.
"""
import triton
import triton.language as tl

from .layout import CLIP_COEF, FOUND_INF, GRAD_NORM, GROUP, INV_SCALE, SCALE, SKIPPED_STEPS

CHUNK = 1024


@triton.jit
def finalize_kernel(sums_ptr, sums_stride, num_all, table_ptr, step_ptr, num_local, globals_ptr,
                    scale_ptr, tracker_ptr, found_in_ptr, max_grad_norm, growth_factor,
                    backoff_factor, growth_interval, HAS_SCALE: tl.constexpr,
                    UPDATE_SCALE: tl.constexpr, HAS_FOUND_IN: tl.constexpr,
                    CLIP: tl.constexpr, CHUNK: tl.constexpr):
    total = tl.zeros([CHUNK], dtype=tl.float64)
    bad = tl.zeros([CHUNK], dtype=tl.float32)
    for start in range(0, num_all, CHUNK):
        offsets = start + tl.arange(0, CHUNK)
        mask = offsets < num_all
        total += tl.load(sums_ptr + offsets, mask=mask, other=0.0).to(tl.float64)
        bad = tl.maximum(bad, tl.load(sums_ptr + sums_stride + offsets, mask=mask, other=0.0))
    found = tl.max(bad, axis=0) > 0
    if HAS_FOUND_IN:
        found = found | (tl.load(found_in_ptr) != 0)
    norm = tl.sqrt(tl.sum(total, axis=0)).to(tl.float32)
    clip = 1.0
    if CLIP:
        clip = tl.minimum(max_grad_norm / (norm + 1e-6), 1.0)
    for start in range(0, num_local, CHUNK):
        offsets = start + tl.arange(0, CHUNK)
        mask = offsets < num_local
        active = tl.load(table_ptr + GROUP * num_local + offsets, mask=mask, other=-1) >= 0
        step = tl.load(step_ptr + offsets, mask=mask, other=0.0)
        tl.store(step_ptr + offsets, tl.where(active, tl.where(found, step, step + 1.0), step), mask=mask)
    scale = 1.0
    if HAS_SCALE:
        scale = tl.load(scale_ptr)
    tl.store(globals_ptr + INV_SCALE, 1.0 / scale)
    if UPDATE_SCALE:
        tracker = tl.load(tracker_ptr)
        grown = tracker + 1 == growth_interval
        new_scale = tl.where(grown, scale * growth_factor, scale)
        # As torch: a growth that overflows fp32 is dropped (the tracker still resets).
        new_scale = tl.where(tl.abs(new_scale) < float("inf"), new_scale, scale)
        new_scale = tl.where(found, scale * backoff_factor, new_scale)
        new_tracker = tl.where(found | grown, 0, tracker + 1)
        tl.store(scale_ptr, new_scale)
        tl.store(tracker_ptr, new_tracker)
        scale = new_scale
    tl.store(globals_ptr + GRAD_NORM, norm)
    tl.store(globals_ptr + CLIP_COEF, clip)
    tl.store(globals_ptr + FOUND_INF, found.to(tl.float32))
    tl.store(globals_ptr + SKIPPED_STEPS, tl.load(globals_ptr + SKIPPED_STEPS) + found.to(tl.float32))
    tl.store(globals_ptr + SCALE, scale)


def finalize(tensor_sums, tensor_table, tensor_step, globals_, scale, growth_tracker,
             found_inf_in, max_grad_norm, growth_factor, backoff_factor, growth_interval,
             update_scale):
    """See docs/kernel_contract.md. max_grad_norm <= 0 means no clipping."""
    dummy = globals_
    finalize_kernel[(1,)](
        tensor_sums, tensor_sums.stride(0), tensor_sums.shape[1], tensor_table, tensor_step,
        tensor_table.shape[1], globals_, scale if scale is not None else dummy,
        growth_tracker if growth_tracker is not None else dummy,
        found_inf_in if found_inf_in is not None else dummy, float(max_grad_norm),
        float(growth_factor), float(backoff_factor), int(growth_interval),
        HAS_SCALE=scale is not None, UPDATE_SCALE=bool(update_scale) and scale is not None,
        HAS_FOUND_IN=found_inf_in is not None, CLIP=max_grad_norm > 0, CHUNK=CHUNK, num_warps=4)
