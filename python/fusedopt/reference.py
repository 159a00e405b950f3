"""The reference math of one fused optimizer step, written per tensor in plain PyTorch.

This is the specification every kernel is tested against, and it is itself tested against
torch.optim.AdamW / torch.optim.SGD, torch.amp.GradScaler and clip_grad_norm_. It favours
clarity over speed: pass float64 tensors for a high-precision reference. Half-precision
params are updated through an fp32 copy (moments are always fp32), as the kernels do.

One step, with s the loss scale (1 without a scaler):
 1. g = grad / s for every tensor; found_inf = any non-finite value in any g.
 2. found_inf: nothing changes (params, moments, step counts); the scaler backs off.
 3. N = sqrt(sum of all g^2); with max_grad_norm: g *= min(1, max_grad_norm / (N + 1e-6)).
 4. k = lr / max_lr for corrected groups (AdamC / SGDC, Defazio 2025, arXiv 2506.02285), else 1.
 5. AdamW or SGD update with decay coefficient weight_decay * k.
 6. The scaler grows after growth_interval clean steps (torch.amp.GradScaler semantics).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

# clip_grad_norm_ adds this to the norm before dividing (torch.nn.utils.clip_grad_norm_).
CLIP_EPS = 1e-6


def decay_multiplier(lr: float, max_lr: float, corrected: bool) -> float:
    """k in the decay lr * wd * k: lr / max_lr for the corrected optimizers, else 1."""
    return lr / max_lr if corrected else 1.0


def clip_coefficient(total_norm: float, max_grad_norm: float | None) -> float:
    """min(1, max_grad_norm / (N + 1e-6)), as clip_grad_norm_; 1 without clipping."""
    if max_grad_norm is None:
        return 1.0
    return min(1.0, max_grad_norm / (total_norm + CLIP_EPS))


def adam_reference(param, grad, exp_avg, exp_avg_sq, *, step, lr, beta1, beta2, eps,
                   weight_decay, decay_multiplier=1.0):
    """One AdamW step on one tensor, in place (torch.optim.AdamW's form of the update).

    `step` is the count after this step (t >= 1). All tensors share one floating dtype.
    """
    param.mul_(1 - lr * weight_decay * decay_multiplier)
    exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    denom = exp_avg_sq.sqrt() / math.sqrt(bias_correction2) + eps
    param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)


def sgd_reference(param, grad, momentum_buffer, *, step, lr, momentum, dampening, weight_decay,
                  nesterov, decay_multiplier=1.0):
    """One torch.optim.SGD step on one tensor, in place, decay coefficient weight_decay * k.

    The momentum buffer is initialised to the first step's direction (torch's buffer-is-None
    case), which here is step == 1.
    """
    direction = grad
    if weight_decay != 0:
        direction = direction.add(param, alpha=weight_decay * decay_multiplier)
    if momentum != 0:
        if step == 1:
            momentum_buffer.copy_(direction)
        else:
            momentum_buffer.mul_(momentum).add_(direction, alpha=1 - dampening)
        direction = direction.add(momentum_buffer, alpha=momentum) if nesterov else momentum_buffer
    param.add_(direction, alpha=-lr)


def scaler_update_reference(scale, growth_tracker, found_inf, *, growth_factor, backoff_factor,
                            growth_interval):
    """The dynamic loss-scale rule of torch.amp.GradScaler.update; returns (scale, tracker)."""
    if found_inf:
        return scale * backoff_factor, 0
    growth_tracker += 1
    if growth_tracker == growth_interval:
        return scale * growth_factor, 0
    return scale, growth_tracker


@dataclass
class ReferenceTensor:
    """One parameter as the reference step sees it.

    `state` holds exp_avg and exp_avg_sq (Adam) or momentum_buffer (SGD); `hyper` the group's
    lr, max_lr, weight_decay, corrected and the optimizer's own hyperparameters. `step` is the
    count of steps taken so far; `grad` None means the tensor is skipped, as in torch.optim.
    """
    param: torch.Tensor
    grad: torch.Tensor | None
    state: dict
    hyper: dict
    step: int = 0
    stats: dict = field(default_factory=dict)


def grad_norm_reference(grads, inv_scale):
    """Per-tensor sums of (grad * inv_scale)^2 and non-finite flags, computed in fp32 or wider."""
    sums, nonfinite = [], []
    for grad in grads:
        g = _compute(grad) * inv_scale
        sums.append(g.square().sum().item())
        nonfinite.append(not bool(torch.isfinite(g).all()))
    return sums, nonfinite


def reference_step(kind, tensors, *, scale=1.0, max_grad_norm=None, external_found_inf=False,
                   want_stats=False):
    """One whole fused step over `tensors` (a list of ReferenceTensor), in place.

    kind: "adam" or "sgd". Returns the global figures as a dict: grad_norm, clip_coef,
    found_inf. With want_stats each ReferenceTensor's `stats` is filled with the per-tensor
    figures (grad_norm, weight_norm, update_norm and v-hat statistics or momentum_norm).
    """
    active = [t for t in tensors if t.grad is not None]
    inv_scale = 1.0 / scale
    sums, nonfinite = grad_norm_reference([t.grad for t in active], inv_scale)
    found_inf = external_found_inf or any(nonfinite)
    total_norm = math.sqrt(math.fsum(sums))
    clip = clip_coefficient(total_norm, max_grad_norm)
    for t, s, bad in zip(active, sums, nonfinite):
        t.stats = {"grad_norm": math.sqrt(s), "nonfinite": bad}
    for t in active:
        old_param = _compute(t.param).clone()
        param = old_param.clone()
        if found_inf:
            _fill_stats(kind, t, old_param, param, grad=None, v_prev=None)
            continue
        t.step += 1
        g = _compute(t.grad) * inv_scale * clip
        h = t.hyper
        k = decay_multiplier(h["lr"], h["max_lr"], h["corrected"])
        v_prev = t.state["exp_avg_sq"].clone() if kind == "adam" else None
        if kind == "adam":
            adam_reference(param, g.to(param.dtype), t.state["exp_avg"], t.state["exp_avg_sq"],
                           step=t.step, lr=h["lr"], beta1=h["beta1"], beta2=h["beta2"],
                           eps=h["eps"], weight_decay=h["weight_decay"], decay_multiplier=k)
        else:
            sgd_reference(param, g.to(param.dtype), t.state["momentum_buffer"], step=t.step,
                          lr=h["lr"], momentum=h["momentum"], dampening=h["dampening"],
                          weight_decay=h["weight_decay"], nesterov=h["nesterov"],
                          decay_multiplier=k)
        t.param.copy_(param)
        if want_stats:
            _fill_stats(kind, t, old_param, _compute(t.param), g, v_prev)
    return {"grad_norm": total_norm, "clip_coef": clip, "found_inf": found_inf}


def _compute(tensor):
    """The dtype the math runs in: fp32 for half types, the tensor's own otherwise."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def _fill_stats(kind, t, old_param, new_param, grad, v_prev):
    """Per-tensor statistics after the step; a skipped step reports the unchanged state."""
    t.stats["weight_norm"] = new_param.norm().item()
    t.stats["update_norm"] = (new_param - old_param).norm().item()
    if kind == "sgd":
        t.stats["momentum_norm"] = t.state["momentum_buffer"].norm().item()
        return
    bias_correction2 = 1 - t.hyper["beta2"] ** t.step if t.step > 0 else 1.0
    vhat = t.state["exp_avg_sq"] / bias_correction2
    t.stats["vhat_min"] = vhat.min().item()
    t.stats["vhat_max"] = vhat.max().item()
    t.stats["vhat_mean"] = vhat.mean().item()
    decreased = (grad.square() < v_prev).sum().item() if grad is not None else 0
    t.stats["v_decrease_frac"] = decreased / vhat.numel()
