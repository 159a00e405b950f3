"""SGD and SGDC: torch.optim.SGD's update, optionally with the schedule-corrected decay.

SGDC applies the decay coefficient wd * (lr_t / lr_max) in place of wd (Defazio 2025, arXiv
2506.02285), holding the steady-state ||g|| / ||w|| of normalized layers constant as lr_t
decays. The decay stays L2-style (added to the gradient), as in torch.optim.SGD.
"""
from __future__ import annotations

from fusedopt.engine import layout
from fusedopt.optimizer import FusedOptimizer

NAME = "sgd"
STATE = ("momentum_buffer",)
STATE_CODES = ("signed",)  # state_dtype="int8" format (fusedopt/engine/int8.py)
HYPER = ("momentum", "dampening", "nesterov")
STATS = layout.COMMON_STATS + (("momentum_sumsq", layout.OP_SUM),)


def validate(group):
    if not group["momentum"] >= 0:
        raise ValueError(f"momentum must be >= 0, got {group['momentum']}")
    if not 0 <= group["dampening"] <= 1:
        raise ValueError(f"dampening must be in [0, 1], got {group['dampening']}")
    if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
        raise ValueError("nesterov requires momentum > 0 and dampening = 0")


def hyper_values(group):
    return {"momentum": float(group["momentum"]), "dampening": float(group["dampening"]),
            "nesterov": float(bool(group["nesterov"]))}


def reference_update(param, grad, state, *, step, lr, weight_decay, momentum, dampening,
                     nesterov, int8_state=False):
    """One torch.optim.SGD step on one tensor, in place; `weight_decay` already carries the
    SGDC factor. The momentum buffer is initialised to the first step's direction (torch's
    buffer-is-None case), which here is step == 1. 8-bit state (int8_state) takes the same
    form."""
    buffer = state["momentum_buffer"]
    direction = grad
    if weight_decay != 0:
        direction = direction.add(param, alpha=weight_decay)
    if momentum != 0:
        if step == 1:
            buffer.copy_(direction)
        else:
            buffer.mul_(momentum).add_(direction, alpha=1 - dampening)
        direction = direction.add(buffer, alpha=momentum) if nesterov else buffer
    param.add_(direction, alpha=-lr)


def reference_stats(state, grad, state_before, step, hyper):
    return (state["momentum_buffer"].square().sum().item(),)


def figures(values, numel):
    return {"momentum_norm": values["momentum_sumsq"].sqrt()}


def load_step(entry):
    # torch.optim.SGD keeps no step count; a saved momentum buffer means at least one step was
    # taken, which is all SGD's first-step rule needs to know.
    return float(entry.get("step", 1 if entry.get("momentum_buffer") is not None else 0))


class SGD(FusedOptimizer):
    """torch.optim.SGD (momentum, dampening, nesterov, L2 decay), fused like AdamW.

    See fusedopt.AdamW for params, corrected, max_lr (defaults to the group's lr at
    construction), max_grad_norm, backend and stats. Statistics: per-tensor gradient, weight,
    update and momentum-buffer norms.
    """

    ALGORITHM = NAME

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0,
                 nesterov=False, *, corrected=False, max_lr=None, max_grad_norm=None,
                 backend="auto", stats=False,
                 master_weight_bits=None, state_dtype="fp32"):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, corrected=corrected, max_lr=max_lr)
        super().__init__(params, defaults, max_grad_norm=max_grad_norm, backend=backend,
                         stats=stats, master_weight_bits=master_weight_bits,
                         state_dtype=state_dtype)


class SGDC(SGD):
    """SGD with the schedule-corrected decay (corrected=True by default); see the module doc."""

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0,
                 nesterov=False, *, corrected=True, max_lr=None, max_grad_norm=None,
                 backend="auto", stats=False,
                 master_weight_bits=None, state_dtype="fp32"):
        super().__init__(params, lr, momentum, dampening, weight_decay, nesterov,
                         corrected=corrected, max_lr=max_lr, max_grad_norm=max_grad_norm,
                         backend=backend, stats=stats,
                         master_weight_bits=master_weight_bits, state_dtype=state_dtype)
