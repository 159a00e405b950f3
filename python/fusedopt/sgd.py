"""SGD and SGDC: torch.optim.SGD's update, optionally with the schedule-corrected decay.

SGDC applies the decay coefficient wd * (lr_t / lr_max) in place of wd (Defazio 2025, arXiv
2506.02285), holding the steady-state ||g|| / ||w|| of normalized layers constant as lr_t
decays. The decay stays L2-style (added to the gradient), as in torch.optim.SGD.
"""
from __future__ import annotations

from fusedopt import flat
from fusedopt.optimizer import FusedOptimizer


class SGD(FusedOptimizer):
    """torch.optim.SGD (momentum, dampening, nesterov, L2 decay), fused like AdamW.

    See fusedopt.AdamW for params, corrected, max_lr (defaults to the group's lr at
    construction), max_grad_norm, backend and stats. Statistics: per-tensor gradient, weight,
    update and momentum-buffer norms.
    """

    KIND = "sgd"
    MOMENTS = ("momentum_buffer",)
    STAT_COLUMNS = flat.SGD_STAT_COLUMNS
    STAT_OPS = flat.SGD_STAT_OPS

    def __init__(self, params, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                 *, corrected=False, max_lr=None, max_grad_norm=None, backend="auto",
                 stats=False):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, corrected=corrected, max_lr=max_lr)
        super().__init__(params, defaults, max_grad_norm=max_grad_norm, backend=backend,
                         stats=stats)

    def _validate_hyper(self, group):
        if not group["momentum"] >= 0:
            raise ValueError(f"momentum must be >= 0, got {group['momentum']}")
        if not 0 <= group["dampening"] <= 1:
            raise ValueError(f"dampening must be in [0, 1], got {group['dampening']}")
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError("nesterov requires momentum > 0 and dampening = 0")

    def _hyper_row(self, group, lr):
        return (lr, group["max_lr"], group["weight_decay"], 0.0, 0.0, 0.0, group["momentum"],
                group["dampening"], float(group["corrected"]), float(group["nesterov"]))

    def _reference_hyper(self, group):
        return dict(lr=float(group["lr"]), max_lr=float(group["max_lr"]),
                    weight_decay=group["weight_decay"], corrected=group["corrected"],
                    momentum=group["momentum"], dampening=group["dampening"],
                    nesterov=group["nesterov"])

    def _stat_values_from_reference(self, tensor):
        s = tensor.stats
        return (s["weight_norm"] ** 2, s["update_norm"] ** 2, s["momentum_norm"] ** 2)


class SGDC(SGD):
    """SGD with the schedule-corrected decay (corrected=True by default); see the module doc."""

    def __init__(self, params, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                 *, corrected=True, max_lr=None, max_grad_norm=None, backend="auto", stats=False):
        super().__init__(params, lr, momentum, dampening, weight_decay, nesterov,
                         corrected=corrected, max_lr=max_lr, max_grad_norm=max_grad_norm,
                         backend=backend, stats=stats)
