"""StepStats: the statistics of one fused step, as device tensors until someone reads them.

Per tensor: grad_norm (unscaled, before clipping), weight_norm (after the step), update_norm
(||p_new - p_old||) and, for Adam, v-hat = v / (1 - beta2^t) min/max/mean and v_decrease_frac,
the fraction of elements with g^2 < v_prev, whose second moment shrank this step: the
beta2-decay regime that precedes Adam loss spikes (Bai et al. 2025, arXiv 2506.04805). For SGD,
momentum_norm. Tensors without a gradient this step read NaN.
Global: grad_norm, clip_coef, found_inf, loss_scale (1 without a scaler), skipped_steps.
"""
from __future__ import annotations

import torch

from fusedopt import flat

ADAM_FIELDS = ("grad_norm", "weight_norm", "update_norm", "vhat_min", "vhat_max", "vhat_mean",
               "v_decrease_frac")
SGD_FIELDS = ("grad_norm", "weight_norm", "update_norm", "momentum_norm")
GLOBAL_FIELDS = {"grad_norm": flat.GRAD_NORM, "clip_coef": flat.CLIP_COEF,
                 "found_inf": flat.FOUND_INF, "loss_scale": flat.SCALE,
                 "skipped_steps": flat.SKIPPED_STEPS}


class StepStats:
    """names[i] labels entry i of every per-tensor figure; .to_dict() syncs once."""

    def __init__(self, names, numel, per_tensor, globals_):
        self.names = names
        self.numel = numel
        self.per_tensor = per_tensor
        self.globals = globals_

    @classmethod
    def from_device_arrays(cls, kind, names, parts, stat_columns, with_update_stats):
        """Derive the figures from each device's tensor_sums / stat_values / globals (no sync)."""
        first = parts[0][0].device
        columns = {}
        for ds, numel in parts:
            inactive = ds.tensor_group < 0
            figures = {"grad_norm": ds.tensor_sums[0].sqrt()}
            if with_update_stats:
                values = dict(zip(stat_columns, ds.stat_values))
                figures["weight_norm"] = values["weight_sumsq"].sqrt()
                figures["update_norm"] = values["update_sumsq"].sqrt()
                if kind == "adam":
                    figures["vhat_min"] = values["vhat_min"].clone()
                    figures["vhat_max"] = values["vhat_max"].clone()
                    figures["vhat_mean"] = values["vhat_sum"] / numel
                    figures["v_decrease_frac"] = values["v_decrease_count"] / numel
                else:
                    figures["momentum_norm"] = values["momentum_sumsq"].sqrt()
            for key, value in figures.items():
                value = value.masked_fill(inactive, float("nan"))
                columns.setdefault(key, []).append(value.to(first, non_blocking=True))
        per_tensor = {key: torch.cat(values) for key, values in columns.items()}
        numel = torch.cat([n.to(first, non_blocking=True) for _, n in parts])
        g = parts[0][0].globals.clone()
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
