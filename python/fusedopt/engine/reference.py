"""The reference of one fused step, written per tensor in plain PyTorch.

This is the specification every kernel is tested against, and it is itself tested against
torch.optim, torch.amp.GradScaler and clip_grad_norm_. It favours clarity over speed: pass
float64 tensors for a high-precision reference. Half-precision params are updated through an
fp32 copy (state is fp32), as the kernels do. The algorithms' own equations are in
fusedopt/algorithms/<name>.py (reference_update).

One step, with s the loss scale (1 without a scaler):
 1. g = grad / s for every tensor; found_inf = any non-finite value in any g.
 2. found_inf: nothing changes (params, state, step counts); the scaler backs off.
 3. N = sqrt(sum of all g^2); with max_grad_norm: g *= min(1, max_grad_norm / (N + 1e-6)).
 4. k = lr / max_lr for corrected groups (Defazio 2025, arXiv 2506.02285), else 1.
 5. The algorithm's update with decay coefficient weight_decay * k.
 6. The scaler grows after growth_interval clean steps (torch.amp.GradScaler semantics).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from fusedopt.engine import int8, master, stochastic

# clip_grad_norm_ adds this to the norm before dividing (torch.nn.utils.clip_grad_norm_).
CLIP_EPS = 1e-6


def decay_multiplier(lr: float, max_lr: float, corrected) -> float:
    """k in the decay lr * wd * k: lr / max_lr for the corrected optimizers, else 1. max_lr 0
    (the default for a group built with lr = 0) gives k = 0, no decay, not a division by zero."""
    if not corrected:
        return 1.0
    return lr / max_lr if max_lr > 0 else 0.0


def clip_coefficient(total_norm: float, max_grad_norm: float | None) -> float:
    """min(1, max_grad_norm / (N + 1e-6)), as clip_grad_norm_; 1 without clipping."""
    if max_grad_norm is None:
        return 1.0
    return min(1.0, max_grad_norm / (total_norm + CLIP_EPS))


def scaler_update(scale, growth_tracker, found_inf, *, growth_factor, backoff_factor,
                  growth_interval):
    """The dynamic loss-scale rule of torch.amp.GradScaler.update; returns (scale, tracker)."""
    if found_inf:
        return scale * backoff_factor, 0
    growth_tracker += 1
    if growth_tracker == growth_interval:
        # The scale is an fp32 tensor in torch: a growth past fp32's range is dropped.
        grown = scale * growth_factor
        return (grown if abs(grown) <= torch.finfo(torch.float32).max else scale), 0
    return scale, growth_tracker


@dataclass
class ReferenceTensor:
    """One parameter as the reference step sees it.

    `state` holds the algorithm's state tensors by name; `hyper` the group's lr, max_lr,
    weight_decay, corrected and the algorithm's own hyperparameters. `step` is the count of
    steps taken so far; `grad` None means the tensor is skipped, as in torch.optim. `stats` gets
    grad_sumsq, nonfinite and, with statistics, the algorithm's STATS column values. A bf16
    param with master weights has its `remainder` and `master_bits` (fusedopt/engine/master.py):
    the step updates the fp32 master and splits it back. bf16 and 8-bit state come with
    `state_index`, each element's index in the state buffers: the update runs on fp32 copies,
    which are then rounded stochastically (fusedopt/engine/stochastic.py). 8-bit state (uint8
    codes) also has its `scales` (per state, the tensor's group scale bytes), `state_groups`
    (each element's group) and `state_codes` (per state, its format): fusedopt/engine/int8.py.
    """
    param: torch.Tensor
    grad: torch.Tensor | None
    state: dict
    hyper: dict
    step: int = 0
    stats: dict = field(default_factory=dict)
    remainder: torch.Tensor | None = None
    master_bits: int | None = None
    state_index: torch.Tensor | None = None
    scales: dict | None = None
    state_groups: torch.Tensor | None = None
    state_codes: dict = field(default_factory=dict)

    def value(self):
        """The param as the update sees it: its fp32 master, or the param in compute dtype."""
        if self.remainder is not None:
            return master.combine(self.param, self.remainder, self.master_bits)
        return compute_view(self.param)

    def store(self, value):
        """Write an updated value back: split into param and remainder, or cast to the param."""
        if self.remainder is not None:
            param, remainder = master.split(value, self.master_bits)
            self.param.copy_(param)
            self.remainder.copy_(remainder)
        else:
            self.param.copy_(value)

    def state_values(self):
        """The state as the update sees it: the tensors themselves (fp32 / float64 state), or
        fp32 copies of bf16 or decoded 8-bit state."""
        if self.state_index is None:
            return self.state
        if self.scales is None:
            return {name: value.float() for name, value in self.state.items()}
        return {name: int8.decode(codes, self.scales[name].long()[self.state_groups],
                                  self.state_codes[name])
                for name, codes in self.state.items()}

    def store_state(self, values):
        """Round updated fp32 state copies into bf16 or 8-bit storage, stochastically with the
        random bits of (step, state_index, stream): streams 1, 2 (the hash's low and high 16 bits)
        in declaration order, as the kernels' state1, state2."""
        for stream, (name, value) in enumerate(values.items(), start=1):
            if self.scales is None:
                self.state[name].copy_(stochastic.to_bf16(value, self.step, self.state_index,
                                                          stream))
                continue
            code = self.state_codes[name]
            random = int8.random_offsets(
                stochastic.random16(self.step, self.state_index, stream), code)
            codes, scales = int8.quantize(value, self.state_groups, self.scales[name].numel(),
                                          random, code)
            self.state[name].copy_(codes)
            self.scales[name].copy_(scales)


def compute_view(tensor):
    """The dtype the math runs in: fp32 for half types, the tensor's own otherwise."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def reference_step(algorithm, tensors, *, scale=1.0, max_grad_norm=None,
                   external_found_inf=False, want_stats=False, reduce_sums=None):
    """One whole fused step over `tensors` (a list of ReferenceTensor), in place.

    algorithm: a fusedopt.algorithms module. `reduce_sums(sums, found_inf)`, if given, turns
    the per-tensor [sum g^2; non-finite] rows (float64 [2, len(tensors)]) and the external flag
    ([1]) into the ones the norm and the skip decision use: the sums over every rank's shard
    for sharded params (fusedopt.distributed). Returns the global figures as a dict: grad_norm,
    clip_coef, found_inf.
    """
    active = [t for t in tensors if t.grad is not None]
    inv_scale = 1.0 / scale
    for t in active:
        g = compute_view(t.grad) * inv_scale
        t.stats = {"grad_sumsq": g.square().sum().item(),
                   "nonfinite": not bool(torch.isfinite(g).all())}
    if reduce_sums is not None:
        sums = torch.tensor([[t.stats["grad_sumsq"] if t.grad is not None else 0.0
                              for t in tensors],
                             [float(t.grad is not None and t.stats["nonfinite"])
                              for t in tensors]], dtype=torch.float64)
        sums, found = reduce_sums(sums, torch.tensor([float(external_found_inf)],
                                                     dtype=torch.float64))
        for t, sumsq, nonfinite in zip(tensors, *sums.tolist()):
            if t.grad is not None:
                t.stats = {"grad_sumsq": sumsq, "nonfinite": nonfinite > 0}
        external_found_inf = bool(found.item() > 0)
    found_inf = external_found_inf or any(t.stats["nonfinite"] for t in active)
    total_norm = math.sqrt(math.fsum(t.stats["grad_sumsq"] for t in active))
    clip = clip_coefficient(total_norm, max_grad_norm)
    for t in active:
        old_param = t.value().clone()
        rounded_state = t.state_index is not None
        state = t.state_values()
        state_before = {name: value.clone() for name, value in state.items()}
        grad = None
        new_param = old_param
        if not found_inf:
            t.step += 1
            grad = compute_view(t.grad) * inv_scale * clip
            param = old_param.clone()
            h = dict(t.hyper)
            k = decay_multiplier(h.pop("lr"), h.pop("max_lr"), h.pop("corrected"))
            algorithm.reference_update(param, grad.to(param.dtype), state, step=t.step,
                                       lr=t.hyper["lr"],
                                       weight_decay=h.pop("weight_decay") * k,
                                       int8_state=t.scales is not None, **h)
            t.store(param)
            if rounded_state:
                t.store_state(state)
            # Statistics see the stored param, or with master weights the fp32 update before
            # the split (for 24 bits: before the master is rounded to 24 bits), as the kernels.
            new_param = param if t.remainder is not None else compute_view(t.param)
        if want_stats:
            t.stats["weight_sumsq"] = new_param.square().sum().item()
            t.stats["update_sumsq"] = (new_param - old_param).square().sum().item()
            # The state's statistics from its fp32 values before any rounding, as the kernels.
            own = algorithm.reference_stats(state, grad, state_before, t.step, t.hyper)
            for (name, _), value in zip(algorithm.STATS[2:], own):
                t.stats[name] = value
    return {"grad_norm": total_norm, "clip_coef": clip, "found_inf": found_inf}
