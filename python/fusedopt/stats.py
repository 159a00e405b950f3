"""StepStats: the statistics of one fused step, as device tensors until someone reads them.

Per tensor: grad_norm (unscaled, before clipping), weight_norm (after the step), update_norm
(||p_new - p_old||) and the algorithm's own figures: for Adam, v-hat = v / (1 - beta2^t)
min/max/mean and v_decrease_frac, the fraction of elements with g^2 < v_prev, whose second
moment shrank this step: the beta2-decay regime that precedes Adam loss spikes (Bai et al. 2025,
arXiv 2506.04805); for SGD and Lion, momentum_norm. Tensors without a gradient this step read
NaN. Global: grad_norm, clip_coef, found_inf, loss_scale (1 without a scaler), skipped_steps.
"""
from __future__ import annotations

import torch

from fusedopt.engine import layout

GLOBAL_FIELDS = {"grad_norm": layout.GRAD_NORM, "clip_coef": layout.CLIP_COEF,
                 "found_inf": layout.FOUND_INF, "loss_scale": layout.SCALE,
                 "skipped_steps": layout.SKIPPED_STEPS}


class StepStats:
    """names[i] labels entry i of every per-tensor figure; .to_dict() syncs once."""

    def __init__(self, names, numel, per_tensor, globals_):
        self.names = names
        self.numel = numel
        self.per_tensor = per_tensor
        self.globals = globals_

    @classmethod
    def from_engine(cls, engine, with_update_stats):
        """Derive the figures from each device's tensor sums, statistics and globals (no sync)."""
        devices = list(engine.devices.values())
        if not devices:
            # An optimizer whose groups hold no params: a step is a no-op.
            empty = torch.zeros(0)
            zeros = {"grad_norm": 0.0, "clip_coef": 1.0, "found_inf": 0.0, "loss_scale": 1.0,
                     "skipped_steps": 0.0}
            return cls([], empty.long(), {"grad_norm": empty},
                       {k: torch.tensor(v) for k, v in zeros.items()})
        first = devices[0].device
        stat_names = [name for name, _ in engine.algorithm.STATS]
        columns = {}
        for ds in devices:
            figures = {"grad_norm": ds.tensor_sums[0].sqrt()}
            if with_update_stats:
                values = dict(zip(stat_names, ds.stat_values))
                figures["weight_norm"] = values["weight_sumsq"].sqrt()
                figures["update_norm"] = values["update_sumsq"].sqrt()
                figures.update(engine.algorithm.figures(values, ds.numel))
            inactive = ~ds.active()
            for key, value in figures.items():
                value = value.masked_fill(inactive, float("nan"))
                columns.setdefault(key, []).append(value.to(first, non_blocking=True))
        per_tensor = {key: torch.cat(values) for key, values in columns.items()}
        numel = torch.cat([ds.numel.to(first, non_blocking=True) for ds in devices])
        names = [engine.names[p] for ds in devices for p in ds.params]
        g = devices[0].globals.clone()
        globals_ = {key: g[slot] for key, slot in GLOBAL_FIELDS.items()}
        return cls(names, numel, per_tensor, globals_)

    def to_dict(self):
        """{"global": {field: float}, "tensors": {name: {field: float}}} (one sync)."""
        keys = list(self.per_tensor)
        table = torch.stack([self.per_tensor[k].float() for k in keys]).cpu().tolist() if keys else []
        global_values = torch.stack(list(self.globals.values())).cpu().tolist()
        out_global = dict(zip(self.globals, global_values))
        out_global["found_inf"] = bool(out_global["found_inf"])
        out_global["skipped_steps"] = int(out_global["skipped_steps"])
        tensors = {name: {k: table[j][i] for j, k in enumerate(keys)}
                   for i, name in enumerate(self.names)}
        return {"global": out_global, "tensors": tensors}

    def __repr__(self):
        return f"StepStats({len(self.names)} tensors, fields={list(self.per_tensor)})"
