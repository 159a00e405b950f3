"""FusedOptimizer: the torch.optim front end over the step engine.

The optimizer keeps torch.optim's surface (param_groups, state, hooks, schedulers, state_dict)
and hands the work to fusedopt.engine: the params stay the module's tensors and the grads
whatever autograd, DDP or the user put in `.grad`; the optimizer owns only its state, exposed
as `opt.state[p]` views in torch.optim's format. The algorithm (fusedopt.algorithms.<name>)
supplies the hyperparameters, their validation and the reference math.
"""
from __future__ import annotations

import importlib
import math
from collections import defaultdict

import torch

from fusedopt import checkpoint, distributed
from fusedopt.engine import backends, int8, master
from fusedopt.engine.step import Engine, ScaleInputs
from fusedopt.stats import StepStats


# state_dtype: the optimizer state's storage. bf16 is rounded stochastically
# (fusedopt/engine/stochastic.py), int8 is 8-bit codes with group scales (fusedopt/engine/int8.py);
# None keeps the default (fp32, float64 for float64 params).
STATE_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "int8": int8.CODES_DTYPE}


class FusedOptimizer(torch.optim.Optimizer):
    """Base of every fusedopt optimizer; a subclass names its algorithm module in ALGORITHM."""

    ALGORITHM = ""
    # torch.amp.GradScaler hands a fused-capable optimizer grad_scale and found_inf instead of
    # unscaling the gradients itself (torch/amp/grad_scaler.py, GradScaler.step).
    _step_supports_amp_scaling = True

    def __init__(self, params, defaults, *, max_grad_norm, backend, stats,
                 master_weight_bits=None, state_dtype="fp32"):
        if max_grad_norm is not None and not (isinstance(max_grad_norm, (int, float))
                                              and max_grad_norm > 0 and math.isfinite(max_grad_norm)):
            raise ValueError(f"max_grad_norm must be None or a positive finite number, got {max_grad_norm!r}")
        if backend not in backends.BACKENDS:
            raise ValueError(f"backend must be one of {backends.BACKENDS}, got {backend!r}")
        if not isinstance(stats, bool):
            raise TypeError(f"stats must be True or False, got {stats!r}")
        if master_weight_bits is not None and master_weight_bits not in master.BITS:
            raise ValueError(f"master_weight_bits must be None, 24 or 32, got "
                             f"{master_weight_bits!r}")
        if state_dtype not in STATE_DTYPES:
            raise ValueError(f"state_dtype must be one of {tuple(STATE_DTYPES)}, got "
                             f"{state_dtype!r}")
        self.master_weight_bits = master_weight_bits
        self.state_dtype = state_dtype
        backends.check_features(backend, self._features())
        self.algorithm = importlib.import_module(f"fusedopt.algorithms.{self.ALGORITHM}")
        self.max_grad_norm = max_grad_norm
        self.backend = backend
        self.collect_stats = stats
        self.engine = None
        super().__init__(params, defaults)
        self.engine = Engine(self.algorithm, list(self.entries()), len(self.param_groups),
                             backend, master_weight_bits, STATE_DTYPES[state_dtype])
        self._bind_state()

    def _features(self):
        """The low-precision options in use, as backends.FEATURE_BACKENDS names them."""
        return tuple(feature for feature, used in (
            ("master_weight_bits", self.master_weight_bits is not None),
            (f"state_dtype='{self.state_dtype}'", self.state_dtype != "fp32")) if used)

    # ----------------------------------------------------------------- parameters
    def add_param_group(self, param_group):
        # torch.optim warns about a param listed twice in one group and keeps both entries;
        # one step per param is what the list means, so the repeats are dropped after the
        # warning (a second update of the same tensor in one fused launch would race).
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        unique = {}
        for i, p in enumerate(group["params"]):
            unique.setdefault(p, i)
        if len(unique) != len(group["params"]):
            kept = sorted(unique.values())
            group["params"] = [group["params"][i] for i in kept]
            if group.get("param_names"):
                group["param_names"] = [group["param_names"][i] for i in kept]
        if group.get("max_lr") is None:
            # lr_max defaults to the group's lr at construction: its peak under warmup-free
            # schedules, and the value schedulers scale down from (Defazio 2025, Sec. 3).
            group["max_lr"] = float(group["lr"])
        for p in group["params"]:
            if not torch.is_floating_point(p) or p.is_complex():
                raise TypeError(f"params: fused optimizers take real floating-point tensors, got {p.dtype}")
            if p.is_sparse:
                raise TypeError("params: sparse parameters are not supported")
        self.validate_group(group)
        if self.engine is not None:
            self._rebuild()

    def validate_group(self, group):
        """Raise ValueError / TypeError naming the first bad hyperparameter of a group."""
        lr = group["lr"]
        if torch.is_tensor(lr):
            if lr.numel() != 1 or not lr.is_floating_point():
                raise ValueError("lr: a tensor lr must hold one floating-point value")
        elif not float(lr) >= 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not float(group["max_lr"]) >= 0:
            raise ValueError(f"max_lr must be >= 0, got {group['max_lr']}")
        if not group["weight_decay"] >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {group['weight_decay']}")
        if not isinstance(group["corrected"], bool):
            raise TypeError(f"corrected must be True or False, got {group['corrected']!r}")
        self.algorithm.validate(group)

    def entries(self):
        """(param, group index, name) in optimizer order, the order of state_dict."""
        index = 0
        for gi, group in enumerate(self.param_groups):
            names = group.get("param_names")
            for i, p in enumerate(group["params"]):
                yield p, gi, (names[i] if names else f"param{index}")
                index += 1

    def _rebuild(self):
        self.engine.rebuild(list(self.entries()), len(self.param_groups))
        self._bind_state()

    def _bind_state(self):
        """opt.state[p] exposes the engine's flat state as torch.optim's per-param state."""
        self.state.clear()
        for p, _, _ in self.entries():
            entry = {"step": self.engine.step_count(p)}
            for name in self.algorithm.STATE:
                entry[name] = self.engine.owner_state(p, name)
            remainder = self.engine.remainder_view(p)
            if remainder is not None:
                entry[checkpoint.REMAINDER] = remainder
            self.state[p] = entry

    # ----------------------------------------------------------------- the step
    @torch.no_grad()
    def step(self, closure=None, *, loss_scale: ScaleInputs | None = None):
        """One fused step. `loss_scale` is the handshake of a loss scaler (fusedopt.GradScaler
        passes its scale and growth tracker, updated inside the step); without it the step reads
        torch.amp.GradScaler's `grad_scale` / `found_inf` attributes if set, else scale 1."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if loss_scale is None:
            loss_scale = ScaleInputs(scale=getattr(self, "grad_scale", None),
                                     found_inf=getattr(self, "found_inf", None))
        if self.engine.refresh(self.param_groups, self.validate_group):
            self._rebuild()
            self.engine.refresh(self.param_groups, self.validate_group)
        self.engine.run(loss_scale, self.max_grad_norm, self.collect_stats)
        return loss

    # ----------------------------------------------------------------- statistics
    def stats(self) -> StepStats:
        """The statistics of the last step as device tensors (no sync until they are read)."""
        return StepStats.from_engine(self.engine, self.collect_stats)

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self):
        """torch.optim's format: per-param step (a CPU float32 tensor) and state (copies), with
        torch's state_dict pre/post hooks called as torch calls them."""
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        state_dict = checkpoint.state_dict(self)
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def fp32_model_state_dict(self, model):
        """model.state_dict() with every param this optimizer keeps a master for replaced by its
        fp32 master value (a copy): what an fp32-master pipeline would save."""
        return checkpoint.fp32_model_state_dict(self, model)

    def load_fp32_model_state_dict(self, model, state_dict):
        """Load fp32 weights into the model: each param with a master takes the value rounded to
        bf16 and its remainder the low bits, so the master equals the loaded value (32 bits) or
        its 24-bit rounding; other entries load as model.load_state_dict loads them."""
        checkpoint.load_fp32_model_state_dict(self, model, state_dict)

    def load_state_dict(self, state_dict):
        """Load a fusedopt or torch.optim state_dict (same algorithm, same groups), with torch's
        load_state_dict pre/post hooks."""
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        checkpoint.load_state_dict(self, state_dict)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def __getstate__(self):
        # torch.optim pickles defaults, state and param_groups only; the engine's tables hold
        # device addresses that mean nothing in a copy, so a copy carries the state by value
        # (8-bit state decoded: it encodes back to the same bytes) and builds its own engine
        # over its own params.
        return {"defaults": self.defaults, "param_groups": self.param_groups,
                "max_grad_norm": self.max_grad_norm, "backend": self.backend,
                "master_weight_bits": self.master_weight_bits, "state_dtype": self.state_dtype,
                "collect_stats": self.collect_stats, "algorithm_name": self.ALGORITHM,
                "saved_state": {p: {**{k: v.clone() for k, v in s.items()},
                                    **{n: self.engine.state_value(p, n).clone()
                                       for n in self.algorithm.STATE}}
                                for p, s in self.state.items()}}

    def __setstate__(self, state):
        saved = state.pop("saved_state")
        state.pop("algorithm_name")
        super().__setstate__({**state, "state": defaultdict(dict)})
        self.algorithm = importlib.import_module(f"fusedopt.algorithms.{self.ALGORITHM}")
        self.engine = Engine(self.algorithm, list(self.entries()), len(self.param_groups),
                             self.backend, self.master_weight_bits,
                             STATE_DTYPES[self.state_dtype])
        with torch.no_grad():
            for p, entry in saved.items():
                self.engine.step_count(p).fill_(float(entry["step"]))
                for name in self.algorithm.STATE:
                    self.engine.load_state(
                        p, name, distributed.local_value(p, entry[name], self.engine.names[p]))
                if checkpoint.REMAINDER in entry:
                    self.engine.remainder_view(p).copy_(entry[checkpoint.REMAINDER])
        self._bind_state()
