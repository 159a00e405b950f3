"""AdamW and AdamC: Adam with decoupled weight decay, optionally schedule-corrected.

AdamC (Defazio 2025, "Why Gradients Rapidly Increase Near the End of Training", arXiv
2506.02285) decays by lr_t * wd * (lr_t / lr_max) instead of lr_t * wd. For layers whose output
is normalized, the steady-state ||g|| / ||w|| of AdamW is about sqrt(2 * wd / lr_t), which grows
as the schedule takes lr_t to zero; the corrected decay holds it constant. Apply the correction
to the normalized layers only (every linear layer but the output head): use a param group with
corrected=True for those and corrected=False for the rest.
"""
from __future__ import annotations

import math

from fusedopt.engine import layout
from fusedopt.optimizer import FusedOptimizer

NAME = "adamw"
STATE = ("exp_avg", "exp_avg_sq")
# state_dtype="int8" formats, per state (fusedopt/engine/int8.py): v is coded on sqrt(v).
STATE_CODES = ("signed", "sqrt")
HYPER = ("beta1", "beta2", "eps")
STATS = layout.COMMON_STATS + (("vhat_min", layout.OP_MIN), ("vhat_max", layout.OP_MAX),
                               ("vhat_sum", layout.OP_SUM), ("v_decrease_count", layout.OP_SUM))


def validate(group):
    betas = group["betas"]
    if len(betas) != 2 or not all(0.0 <= float(b) < 1.0 for b in betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
    if not group["eps"] >= 0:
        raise ValueError(f"eps must be >= 0, got {group['eps']}")


def hyper_values(group):
    beta1, beta2 = group["betas"]
    return {"beta1": float(beta1), "beta2": float(beta2), "eps": float(group["eps"])}


def reference_update(param, grad, state, *, step, lr, weight_decay, beta1, beta2, eps,
                     int8_state=False):
    """One AdamW step on one tensor, in place (torch.optim.AdamW's form of the update).

    `step` is the count after this step (t >= 1); `weight_decay` already carries the AdamC
    factor. All tensors share one floating dtype. With `int8_state` (8-bit moments, whose
    update the GPU's instruction issue bounds) sqrt(1 - beta2^t) moves from the division into
    the scalars: m / (sqrt(v) + eps * sqrt(1 - beta2^t)) times lr / (1 - beta1^t) *
    sqrt(1 - beta2^t), the same quotient up to rounding, without a division per element.
    """
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    param.mul_(1 - lr * weight_decay)
    exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    if int8_state:
        correction2_sqrt = math.sqrt(bias_correction2)
        denom = exp_avg_sq.sqrt() + eps * correction2_sqrt
        param.addcdiv_(exp_avg, denom, value=-(lr / bias_correction1) * correction2_sqrt)
        return
    denom = exp_avg_sq.sqrt() / math.sqrt(bias_correction2) + eps
    param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)


def reference_stats(state, grad, state_before, step, hyper):
    """v-hat = v / (1 - beta2^t) min/max/sum and the count of g^2 < v_prev (0 on a skipped step,
    grad None): the beta2-decay regime that precedes Adam loss spikes (Bai et al. 2025)."""
    bias_correction2 = 1 - hyper["beta2"] ** step if step > 0 else 1.0
    vhat = state["exp_avg_sq"] / bias_correction2
    decreased = 0 if grad is None else (grad.square() < state_before["exp_avg_sq"]).sum().item()
    if vhat.numel() == 0:
        # What the kernels' fixed-order reduction gives over no blocks: min +inf, max -inf.
        return math.inf, -math.inf, 0.0, 0
    return vhat.min().item(), vhat.max().item(), vhat.sum().item(), decreased


def figures(values, numel):
    return {"vhat_min": values["vhat_min"].clone(), "vhat_max": values["vhat_max"].clone(),
            "vhat_mean": values["vhat_sum"] / numel,
            "v_decrease_frac": values["v_decrease_count"] / numel}


def load_step(entry):
    return float(entry.get("step", 0))


class AdamW(FusedOptimizer):
    """torch.optim.AdamW's update, fused with unscaling, inf skip, clipping and statistics.

    Args:
        params: tensors, named tensors (model.named_parameters(): statistics carry the names)
            or param-group dicts; every key below can be set per group.
        lr, betas, eps, weight_decay: as torch.optim.AdamW. lr may be a 0-d tensor (on the
            params' device), which a CUDA-graph-captured step reads at replay.
        corrected: apply the AdamC decay correction lr * wd * (lr / max_lr).
        max_lr: lr_max of the correction; defaults to the group's lr at construction, i.e. the
            peak of a schedule that starts at its maximum. With warmup, pass the peak lr.
        max_grad_norm: clip the global gradient norm over all of this optimizer's params, as
            clip_grad_norm_(params, max_grad_norm) would; None disables clipping.
        backend: "auto" (CUDA tensors -> the fastest built GPU backend, CPU -> "reference"),
            "triton", "cuda" or "reference".
        stats: also produce per-tensor weight/update norms and v-hat statistics (opt.stats()).
        master_weight_bits: None, 32 or 24: keep a master value for every bfloat16 param, as
            the param plus low bits the optimizer owns (2 or 1 B/param): 32 is fp32 master
            weights bit for bit, 24 a 16-bit-significand master. The param is the master
            rounded to bf16 (to nearest, ties away from zero). Triton and reference backends.
    """

    ALGORITHM = NAME

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, *,
                 corrected=False, max_lr=None, max_grad_norm=None, backend="auto", stats=False,
                 master_weight_bits=None, state_dtype="fp32"):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        corrected=corrected, max_lr=max_lr)
        super().__init__(params, defaults, max_grad_norm=max_grad_norm, backend=backend,
                         stats=stats, master_weight_bits=master_weight_bits,
                         state_dtype=state_dtype)


class AdamC(AdamW):
    """AdamW with the schedule-corrected decay (corrected=True by default); see the module doc."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, *,
                 corrected=True, max_lr=None, max_grad_norm=None, backend="auto", stats=False,
                 master_weight_bits=None, state_dtype="fp32"):
        super().__init__(params, lr, betas, eps, weight_decay, corrected=corrected, max_lr=max_lr,
                         max_grad_norm=max_grad_norm, backend=backend, stats=stats,
                         master_weight_bits=master_weight_bits, state_dtype=state_dtype)
