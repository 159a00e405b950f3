"""update: the one update kernel, Adam(W/C) or SGD(C) selected by a constexpr flag.

One program per BLOCK (4096 elements). The optimizer math lives here once; ADAM and STATS are
constexpr so the unused paths compile away. Scalars (lr, decay, bias corrections) are formed
per block in fp64, as torch.optim forms them in Python doubles; element math is fp32.

Bytes per element, fp32 Adam: read g, p, m, v (16 B), write p, m, v (12 B) = 28 B; with the
grad_norm pass (4 B) the step moves 32 B/param. bf16 params: read g, p (2+2), m, v (4+4), write
p (2), m, v (4+4) = 22 B, 24 B per step. Statistics add 4 B per block per column (~0.1%).
Checked offline (triton.compile for sm_90, no GPU needed): full blocks issue ld/st.global.v4,
16 fp32 elements per thread in flight per array.

On found_inf the kernel branches out before touching anything: a skip factor would turn
0 * NaN into NaN in the moments.
"""
import triton
import triton.language as tl

from fusedopt.flat import BLOCK

from .layout import (BETA1, BETA2, CLIP_COEF, CORRECTED, DAMPENING, EPS, FOUND_INF, HYPER_COLUMNS,
                     INV_SCALE, LR, MAX_LR, MOMENTUM, NESTEROV, WEIGHT_DECAY)


@triton.jit
def _power(base, exponent):
    """base ** exponent by squaring, in fp64: exact to a few ulps for any step count (an exp2/log2
    in fp32 would put a 1e-4 relative error on 1 - beta2 ** t at t = 1)."""
    result = base * 0.0 + 1.0
    remaining = exponent
    while remaining > 0:
        result = tl.where((remaining & 1) == 1, result * base, result)
        base = base * base
        remaining = remaining >> 1
    return result


@triton.jit
def _store_rounding(x, dtype: tl.constexpr):
    """fp32 -> storage dtype, round to nearest even as torch's casts do. bf16 is rounded with
    integer ops: Triton 3.9's interpreter truncates fp32 -> bf16 casts (even with
    fp_downcast_rounding="rtne"), and the same bits come out of the GPU's cvt.rn.bf16.f32."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def _combine_adam_stats(w1, d1, lo1, hi1, s1, c1, w2, d2, lo2, hi2, s2, c2):
    return w1 + w2, d1 + d2, tl.minimum(lo1, lo2), tl.maximum(hi1, hi2), s1 + s2, c1 + c2


@triton.jit
def _store_partials(stats_ptr, stride, pid, weight_sumsq, update_sumsq, third, vhat_max, vhat_sum,
                    decreased, ADAM: tl.constexpr):
    tl.store(stats_ptr + pid, weight_sumsq)
    tl.store(stats_ptr + stride + pid, update_sumsq)
    tl.store(stats_ptr + 2 * stride + pid, third)
    if ADAM:
        tl.store(stats_ptr + 3 * stride + pid, vhat_max)
        tl.store(stats_ptr + 4 * stride + pid, vhat_sum)
        tl.store(stats_ptr + 5 * stride + pid, decreased)


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
def _step_block(param_ptr, grad_ptr, moment1_ptr, moment2_ptr, offsets, mask, row, step, pid,
                globals_ptr, stats_ptr, stats_stride, ADAM: tl.constexpr, STATS: tl.constexpr,
                MASKED: tl.constexpr):
    """The update of one block. MASKED is constexpr: full blocks (all but each tensor's last)
    load and store without a mask, which keeps the 16-byte vector accesses; a mask against a
    tensor end read from memory has no provable alignment and Triton then emits 4-byte ones."""
    lr = tl.load(row + LR).to(tl.float64)
    weight_decay = tl.load(row + WEIGHT_DECAY).to(tl.float64)
    # AdamC / SGDC (Defazio 2025, arXiv 2506.02285): decay lr * wd * (lr / max_lr).
    k = tl.where(tl.load(row + CORRECTED) != 0, lr / tl.load(row + MAX_LR).to(tl.float64), 1.0)
    p_old = _load(param_ptr, offsets, mask, MASKED)
    p = p_old.to(tl.float32)
    g = _load(grad_ptr, offsets, mask, MASKED).to(tl.float32)
    # Two multiplies in torch's order: unscale_ (g * 1/scale), then clip_grad_norm_'s g * c.
    g = g * tl.load(globals_ptr + INV_SCALE) * tl.load(globals_ptr + CLIP_COEF)
    if ADAM:
        beta1 = tl.load(row + BETA1).to(tl.float64)
        beta2 = tl.load(row + BETA2).to(tl.float64)
        eps = tl.load(row + EPS)
        correction1 = 1.0 - _power(beta1, step)
        correction2 = 1.0 - _power(beta2, step)
        step_size = (lr / correction1).to(tl.float32)
        correction2_sqrt = tl.sqrt(correction2).to(tl.float32)
        m1 = _load(moment1_ptr, offsets, mask, MASKED)
        v = _load(moment2_ptr, offsets, mask, MASKED)
        gg = g * g
        v_old = v
        p = p * (1.0 - lr * weight_decay * k).to(tl.float32)
        m1 = beta1.to(tl.float32) * m1 + (1.0 - beta1).to(tl.float32) * g
        v = beta2.to(tl.float32) * v + (1.0 - beta2).to(tl.float32) * gg
        # IEEE sqrt and division (Triton's defaults are approximate) to stay within rounding
        # of torch's sqrt() and addcdiv_.
        denom = tl.div_rn(tl.sqrt_rn(v), correction2_sqrt) + eps
        p = p - step_size * tl.div_rn(m1, denom)
        _store(moment2_ptr, offsets, v, mask, MASKED)
        _store(moment1_ptr, offsets, m1, mask, MASKED)
    else:
        momentum = tl.load(row + MOMENTUM)
        direction = g
        momentum_sumsq = 0.0
        if weight_decay != 0:
            direction = direction + (weight_decay * k).to(tl.float32) * p
        if momentum != 0:
            # Without momentum the buffer is neither read nor written (4 B/elem saved).
            dampening = tl.load(row + DAMPENING)
            m1 = _load(moment1_ptr, offsets, mask, MASKED)
            m1 = tl.where(step == 1, direction, momentum * m1 + (1.0 - dampening) * direction)
            _store(moment1_ptr, offsets, m1, mask, MASKED)
            momentum_sumsq = tl.sum(m1 * m1, axis=0)
            if tl.load(row + NESTEROV) != 0:
                direction = direction + momentum * m1
            else:
                direction = m1
        p = p - lr.to(tl.float32) * direction
    p_new = _store_rounding(p, p_old.dtype)
    _store(param_ptr, offsets, p_new, mask, MASKED)
    if STATS:
        p_stored = p_new.to(tl.float32)
        p_before = p_old.to(tl.float32)
        if MASKED:
            # Masked lanes loaded 0 and computed garbage from it: keep them out of the sums.
            # Only the tail block pays for the selects: applied to every block they cost 13%
            # of the update at 1.1B fp32 (10.28 ms -> 11.66 ms; now 10.44 ms, H100).
            p_stored = tl.where(mask, p_stored, 0.0)
            p_before = tl.where(mask, p_before, 0.0)
        delta = p_stored - p_before
        if ADAM:
            vhat = v / correction2.to(tl.float32)
            decreased = (gg < v_old).to(tl.float32)
            vhat_low, vhat_high, vhat_sum = vhat, vhat, vhat
            if MASKED:
                decreased = tl.where(mask, decreased, 0.0)
                vhat_low = tl.where(mask, vhat, float("inf"))
                vhat_high = tl.where(mask, vhat, float("-inf"))
                vhat_sum = tl.where(mask, vhat, 0.0)
            # One reduction of six operands: one round through shared memory instead of six
            # (sm_90 PTX of the whole kernel, every path: 29 -> 19 bar.sync).
            weight_sumsq, update_sumsq, vhat_min, vhat_max, vhat_sum, decreased = tl.reduce(
                (p_stored * p_stored, delta * delta, vhat_low, vhat_high, vhat_sum, decreased), 0,
                _combine_adam_stats)
            _store_partials(stats_ptr, stats_stride, pid, weight_sumsq, update_sumsq, vhat_min,
                            vhat_max, vhat_sum, decreased, ADAM)
        else:
            _store_partials(stats_ptr, stats_stride, pid, tl.sum(p_stored * p_stored, axis=0),
                            tl.sum(delta * delta, axis=0), momentum_sumsq, 0.0, 0.0, 0.0, ADAM)


@triton.jit
def update_kernel(param_ptr, grad_ptr, moment1_ptr, moment2_ptr, block_tensor_ptr, tensor_end_ptr,
                  tensor_group_ptr, tensor_step_ptr, hyper_ptr, globals_ptr, stats_ptr,
                  stats_stride, ADAM: tl.constexpr, STATS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    tensor = tl.load(block_tensor_ptr + pid)
    group = tl.load(tensor_group_ptr + tensor)
    found_inf = tl.load(globals_ptr + FOUND_INF)
    end = tl.load(tensor_end_ptr + tensor)
    start = pid.to(tl.int64) * BLOCK
    offsets = start + tl.arange(0, BLOCK)
    mask = offsets < end
    row = hyper_ptr + group * HYPER_COLUMNS
    step = tl.load(tensor_step_ptr + tensor).to(tl.int32)
    if group < 0:
        if STATS:
            if ADAM:
                _store_partials(stats_ptr, stats_stride, pid, 0.0, 0.0, float("inf"),
                                float("-inf"), 0.0, 0.0, ADAM)
            else:
                _store_partials(stats_ptr, stats_stride, pid, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, ADAM)
    elif found_inf != 0:
        if STATS:
            # A skipped step reports the unchanged state: weight norm, no update, current v-hat.
            p = tl.load(param_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            m1 = tl.load(moment1_ptr + offsets, mask=mask, other=0.0)
            if ADAM:
                correction2 = tl.maximum(1.0 - _power(tl.load(row + BETA2).to(tl.float64), step),
                                         1e-300)
                correction2 = tl.where(step > 0, correction2, 1.0)
                vhat = tl.load(moment2_ptr + offsets, mask=mask, other=0.0) / correction2.to(tl.float32)
                _store_partials(stats_ptr, stats_stride, pid, tl.sum(p * p, axis=0), 0.0,
                                tl.min(tl.where(mask, vhat, float("inf")), axis=0),
                                tl.max(tl.where(mask, vhat, float("-inf")), axis=0),
                                tl.sum(vhat, axis=0), 0.0, ADAM)
            else:
                _store_partials(stats_ptr, stats_stride, pid, tl.sum(p * p, axis=0), 0.0,
                                tl.sum(m1 * m1, axis=0), 0.0, 0.0, 0.0, ADAM)
    elif start + BLOCK <= end:
        _step_block(param_ptr, grad_ptr, moment1_ptr, moment2_ptr, offsets, mask, row, step, pid,
                    globals_ptr, stats_ptr, stats_stride, ADAM, STATS, False)
    else:
        _step_block(param_ptr, grad_ptr, moment1_ptr, moment2_ptr, offsets, mask, row, step, pid,
                    globals_ptr, stats_ptr, stats_stride, ADAM, STATS, True)


def update(optimizer, param, grad, moment1, moment2, block_tensor, tensor_end, tensor_group,
           tensor_step, hyper, globals_, stats_partials):
    """One Adam ("adam") or SGD ("sgd") update over a flat buffer; see docs/kernel_contract.md."""
    adam = optimizer == "adam"
    stats = stats_partials is not None
    update_kernel[(block_tensor.numel(),)](
        param, grad, moment1, moment2 if adam else moment1, block_tensor, tensor_end, tensor_group,
        tensor_step, hyper, globals_, stats_partials if stats else globals_,
        stats_partials.stride(0) if stats else 0, ADAM=adam, STATS=stats, BLOCK=BLOCK,
        # 4 warps (32 elements a thread): 10.28 ms at 1.1B fp32 on the H100 against 11.76 ms
        # with 8 and 11.12 ms with 16 (triton.testing.do_bench medians, one run).
        num_warps=4)
