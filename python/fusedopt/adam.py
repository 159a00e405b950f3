"""AdamW and AdamC: Adam with decoupled weight decay, optionally schedule-corrected.

AdamC (Defazio 2025, "Why Gradients Rapidly Increase Near the End of Training", arXiv
2506.02285) decays by lr_t * wd * (lr_t / lr_max) instead of lr_t * wd. For layers whose output
is normalized, the steady-state ||g|| / ||w|| of AdamW is about sqrt(2 * wd / lr_t), which grows
as the schedule takes lr_t to zero; the corrected decay holds it constant. Apply the correction
to the normalized layers only (every linear layer but the output head): use a param group with
corrected=True for those and corrected=False for the rest.
"""
from __future__ import annotations

from fusedopt import flat
from fusedopt.optimizer import FusedOptimizer


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
    """

    KIND = "adam"
    MOMENTS = ("exp_avg", "exp_avg_sq")
    STAT_COLUMNS = flat.ADAM_STAT_COLUMNS
    STAT_OPS = flat.ADAM_STAT_OPS

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, *,
                 corrected=False, max_lr=None, max_grad_norm=None, backend="auto", stats=False):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        corrected=corrected, max_lr=max_lr)
        super().__init__(params, defaults, max_grad_norm=max_grad_norm, backend=backend,
                         stats=stats)

    def _validate_hyper(self, group):
        betas = group["betas"]
        if len(betas) != 2 or not all(0.0 <= float(b) < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
        if not group["eps"] >= 0:
            raise ValueError(f"eps must be >= 0, got {group['eps']}")

    def _hyper_row(self, group, lr):
        beta1, beta2 = group["betas"]
        return (lr, group["max_lr"], group["weight_decay"], beta1, beta2, group["eps"], 0.0, 0.0,
                float(group["corrected"]), 0.0)

    def _reference_hyper(self, group):
        beta1, beta2 = group["betas"]
        return dict(lr=float(group["lr"]), max_lr=float(group["max_lr"]),
                    weight_decay=group["weight_decay"], corrected=group["corrected"],
                    beta1=float(beta1), beta2=float(beta2), eps=group["eps"])

    def _stat_values_from_reference(self, tensor):
        s, n = tensor.stats, tensor.param.numel()
        return (s["weight_norm"] ** 2, s["update_norm"] ** 2, s["vhat_min"], s["vhat_max"],
                s["vhat_mean"] * n, s["v_decrease_frac"] * n)


class AdamC(AdamW):
    """AdamW with the schedule-corrected decay (corrected=True by default); see the module doc."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, *,
                 corrected=True, max_lr=None, max_grad_norm=None, backend="auto", stats=False):
        super().__init__(params, lr, betas, eps, weight_decay, corrected=corrected, max_lr=max_lr,
                         max_grad_norm=max_grad_norm, backend=backend, stats=stats)
