"""GradScaler: dynamic loss scaling whose unscale, inf check and update run inside the step.

With a fusedopt optimizer, scaler.step(opt) runs the whole fused step: grad_norm divides by the
scale while it reduces, finalize decides the skip and updates the scale and growth tracker in
device memory, and update() has nothing left to do. Nothing syncs. The scale rule is
torch.amp.GradScaler's: back off on inf/NaN, grow after growth_interval clean steps.
"""
from __future__ import annotations

import torch

from fusedopt.engine.step import ScaleInputs
from fusedopt.optimizer import FusedOptimizer


class GradScaler:
    """torch.amp.GradScaler's interface for fusedopt optimizers.

    One scaler drives one fusedopt optimizer per update() (put every param into that
    optimizer's groups); torch optimizers keep using torch.amp.GradScaler, which also accepts
    fusedopt optimizers.
    """

    def __init__(self, init_scale=2.0 ** 16, growth_factor=2.0, backoff_factor=0.5,
                 growth_interval=2000, enabled=True):
        if not init_scale > 0:
            raise ValueError(f"init_scale must be > 0, got {init_scale}")
        if not growth_factor > 1.0:
            raise ValueError(f"growth_factor must be > 1, got {growth_factor}")
        if not 0.0 < backoff_factor < 1.0:
            raise ValueError(f"backoff_factor must be in (0, 1), got {backoff_factor}")
        if not (isinstance(growth_interval, int) and growth_interval > 0):
            raise ValueError(f"growth_interval must be a positive int, got {growth_interval}")
        self._init_scale = float(init_scale)
        self._growth_factor = float(growth_factor)
        self._backoff_factor = float(backoff_factor)
        self._growth_interval = growth_interval
        self._enabled = bool(enabled)
        self._scale = None
        self._growth_tracker = None
        self._loaded_tracker = 0
        self._unscaled = set()
        self._stepped = set()

    def is_enabled(self):
        return self._enabled

    def _lazy_init(self, device):
        self._scale = torch.full((1,), self._init_scale, dtype=torch.float32, device=device)
        self._growth_tracker = torch.full((1,), self._loaded_tracker, dtype=torch.int32,
                                          device=device)

    def scale(self, outputs):
        """Multiply a loss (or a list/tuple of them) by the current scale, on the device."""
        if not self._enabled:
            return outputs
        if torch.is_tensor(outputs):
            if self._scale is None:
                self._lazy_init(outputs.device)
            return outputs * self._scale.to(outputs.device, non_blocking=True).reshape(())
        if isinstance(outputs, (list, tuple)):
            return type(outputs)(self.scale(o) for o in outputs)
        raise TypeError(f"outputs must be a tensor or a list/tuple of tensors, got {type(outputs)}")

    def _check_optimizer(self, optimizer, verb):
        if not isinstance(optimizer, FusedOptimizer):
            raise TypeError(f"optimizer: fusedopt.GradScaler.{verb} takes a fusedopt optimizer, got "
                            f"{type(optimizer).__name__}; use torch.amp.GradScaler for torch optimizers")
        if self._scale is None:
            raise RuntimeError(f"GradScaler.{verb}: no loss was scaled yet (call scaler.scale(loss))")

    def unscale_(self, optimizer):
        """Divide the optimizer's gradients by the scale in place (for custom clipping).

        The following step() then skips its own unscaling but still checks for inf/NaN and
        updates the scale. Costs one extra read+write of the gradients, as in torch.
        """
        if not self._enabled:
            return
        self._check_optimizer(optimizer, "unscale_")
        if optimizer in self._unscaled:
            raise RuntimeError("unscale_() has already been called on this optimizer since the last update()")
        grads = {}
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    grads.setdefault(p.grad.device, []).append(p.grad)
        with torch.no_grad():
            for device, device_grads in grads.items():
                # torch.amp.GradScaler's reciprocal: scale.double().reciprocal().float().
                inv_scale = self._scale.double().reciprocal().float().to(device, non_blocking=True).reshape(())
                torch._foreach_mul_(device_grads, inv_scale)
        self._unscaled.add(optimizer)

    def step_inputs(self, optimizer):
        """The handshake a fusedopt optimizer's step takes (`opt.step(loss_scale=...)`): the
        scale to unscale by and to update in place, the growth tracker and the growth rule."""
        return ScaleInputs(scale=self._scale, growth_tracker=self._growth_tracker,
                           updates_scale=True, already_unscaled=optimizer in self._unscaled,
                           growth_factor=self._growth_factor,
                           backoff_factor=self._backoff_factor,
                           growth_interval=self._growth_interval)

    def step(self, optimizer, *args, **kwargs):
        """The fused step: unscale, inf check (skip), clip, update and the scale update."""
        if not self._enabled:
            return optimizer.step(*args, **kwargs)
        self._check_optimizer(optimizer, "step")
        if self._stepped:
            raise RuntimeError("fusedopt.GradScaler drives one optimizer step per update(): "
                               "call scaler.update() after each scaler.step(), and put all "
                               "params into one optimizer's param groups")
        result = optimizer.step(*args, loss_scale=self.step_inputs(optimizer), **kwargs)
        self._stepped.add(optimizer)
        return result

    def update(self, new_scale=None):
        """End the iteration. The fused step already updated the scale; new_scale overrides it."""
        if not self._enabled:
            return
        if new_scale is not None:
            if self._scale is None:
                raise RuntimeError("GradScaler.update(new_scale): no loss was scaled yet")
            value = new_scale if torch.is_tensor(new_scale) else torch.tensor(float(new_scale))
            self._scale.copy_(value.reshape(1).to(self._scale), non_blocking=True)
        self._unscaled.clear()
        self._stepped.clear()

    def get_scale(self):
        """The current scale as a Python float (syncs)."""
        if not self._enabled:
            return 1.0
        return self._init_scale if self._scale is None else float(self._scale)

    def get_growth_factor(self):
        return self._growth_factor

    def get_backoff_factor(self):
        return self._backoff_factor

    def get_growth_interval(self):
        return self._growth_interval

    def state_dict(self):
        """torch.amp.GradScaler's keys, so checkpoints move between the two."""
        if not self._enabled:
            return {}
        return {"scale": self.get_scale(), "growth_factor": self._growth_factor,
                "backoff_factor": self._backoff_factor, "growth_interval": self._growth_interval,
                "_growth_tracker": 0 if self._growth_tracker is None else int(self._growth_tracker)}

    def load_state_dict(self, state_dict):
        if not self._enabled:
            return
        if len(state_dict) == 0:
            raise RuntimeError("state_dict: empty, probably saved from a disabled scaler")
        self._init_scale = float(state_dict["scale"])
        self._growth_factor = float(state_dict["growth_factor"])
        self._backoff_factor = float(state_dict["backoff_factor"])
        self._growth_interval = int(state_dict["growth_interval"])
        self._loaded_tracker = int(state_dict["_growth_tracker"])
        if self._scale is not None:
            self._scale.fill_(self._init_scale)
            self._growth_tracker.fill_(self._loaded_tracker)
