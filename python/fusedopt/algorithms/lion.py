"""Lion and LionC: the sign-momentum optimizer of Chen et al. 2023 ("Symbolic Discovery of
Optimization Algorithms", arXiv 2302.06675, Algorithm 2), optionally schedule-corrected.

    c = b1 * m + (1 - b1) * g
    p = p * (1 - lr * wd) - lr * sign(c)
    m = b2 * m + (1 - b2) * g

Every coordinate moves by exactly lr, so the update norm is lr * sqrt(numel) and the paper
recommends an lr 3-10x smaller and a weight decay 3-10x larger than AdamW's. LionC decays by
lr * wd * (lr / lr_max) as AdamC does (Defazio 2025, arXiv 2506.02285): Lion's weights also
reach an equilibrium norm set by lr * wd, which the correction keeps from drifting as lr decays.
"""
from __future__ import annotations

from fusedopt.engine import layout
from fusedopt.optimizer import FusedOptimizer

NAME = "lion"
STATE = ("exp_avg",)
STATE_CODES = ("signed",)  # state_dtype="int8" format (fusedopt/engine/int8.py)
HYPER = ("beta1", "beta2")
STATS = layout.COMMON_STATS + (("momentum_sumsq", layout.OP_SUM),)


def validate(group):
    betas = group["betas"]
    if len(betas) != 2 or not all(0.0 <= float(b) <= 1.0 for b in betas):
        raise ValueError(f"betas must be two numbers in [0, 1], got {betas}")


def hyper_values(group):
    beta1, beta2 = group["betas"]
    return {"beta1": float(beta1), "beta2": float(beta2)}


def reference_update(param, grad, state, *, step, lr, weight_decay, beta1, beta2,
                     int8_state=False):
    """One Lion step on one tensor, in place; `weight_decay` already carries the LionC factor.
    8-bit state (int8_state) takes the same form."""
    exp_avg = state["exp_avg"]
    direction = (exp_avg * beta1).add_(grad, alpha=1 - beta1).sign_()
    param.mul_(1 - lr * weight_decay).add_(direction, alpha=-lr)
    exp_avg.mul_(beta2).add_(grad, alpha=1 - beta2)


def reference_stats(state, grad, state_before, step, hyper):
    return (state["exp_avg"].square().sum().item(),)


def figures(values, numel):
    return {"momentum_norm": values["momentum_sumsq"].sqrt()}


def load_step(entry):
    return float(entry.get("step", 0))


class Lion(FusedOptimizer):
    """Lion (Chen et al. 2023), fused with unscaling, inf skip, clipping and statistics.

    Args as fusedopt.AdamW, with betas (b1 interpolates the update direction, b2 the momentum)
    and defaults from the paper: lr 1e-4, betas (0.9, 0.99), weight_decay 0. Statistics:
    per-tensor gradient, weight, update and momentum norms.
    """

    ALGORITHM = NAME

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, *, corrected=False,
                 max_lr=None, max_grad_norm=None, backend="auto", stats=False,
                 master_weight_bits=None, state_dtype="fp32"):
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, corrected=corrected,
                        max_lr=max_lr)
        super().__init__(params, defaults, max_grad_norm=max_grad_norm, backend=backend,
                         stats=stats, master_weight_bits=master_weight_bits,
                         state_dtype=state_dtype)


class LionC(Lion):
    """Lion with the schedule-corrected decay (corrected=True by default); see the module doc."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, *, corrected=True,
                 max_lr=None, max_grad_norm=None, backend="auto", stats=False,
                 master_weight_bits=None, state_dtype="fp32"):
        super().__init__(params, lr, betas, weight_decay, corrected=corrected, max_lr=max_lr,
                         max_grad_norm=max_grad_norm, backend=backend, stats=stats,
                         master_weight_bits=master_weight_bits, state_dtype=state_dtype)
