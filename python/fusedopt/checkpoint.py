"""torch.optim-format state_dicts in and out of a fusedopt optimizer.

Out: per param, `step` as a CPU float32 tensor and copies of the state tensors, keyed by the
param's index in optimizer order, and the param groups with their hyperparameters, as
torch.optim.AdamW / SGD write them. Every param has an entry, also before its first step (step
0, zero state; torch.optim then has none, and loads such an entry to the same effect):
torch.distributed.checkpoint loads into the tensors of a fresh optimizer's state_dict, so those
must all be there. State of DTensor params (FSDP2) is saved as DTensors with the param's
placements. 8-bit state is saved decoded, as fp32 (4x its resident size while saving): such a
checkpoint loads into torch.optim, any tier and any sharding, and back into the same optimizer
bit-exactly (decoded values encode to the same codes and scales; fusedopt/engine/int8.py). In: a fusedopt or torch.optim state_dict of the same algorithm and groups; DTensor
values are resharded to the param's placements, full tensors sliced to this rank's shard.
"""
from __future__ import annotations

import torch

from fusedopt import distributed
from fusedopt.engine import master

# The state key of a bf16 param's master-weight remainder (fusedopt/engine/master.py). A
# checkpoint without it (torch.optim's, or one saved without master weights) loads with the
# remainder zero: each master starts equal to its param.
REMAINDER = "master_remainder"

# Options of torch.optim groups that fusedopt does not implement: a checkpoint that sets one
# would train differently here, so it is refused.
UNSUPPORTED_OPTIONS = ("amsgrad", "maximize", "differentiable")


def state_dict(optimizer):
    engine, names = optimizer.engine, optimizer.algorithm.STATE
    entries = list(optimizer.entries())
    steps = {p: float(engine.step_count(p)) for p, _, _ in entries}
    state = {}
    for index, (p, _, _) in enumerate(entries):
        entry = {"step": torch.tensor(steps[p], dtype=torch.float32)}
        for name in names:
            entry[name] = distributed.like_param(p, engine.state_value(p, name).clone())
        remainder = engine.remainder_view(p)
        if remainder is not None:
            entry[REMAINDER] = distributed.like_param(p, remainder.clone())
        state[index] = entry
    return {"state": state, "param_groups": saved_groups(optimizer)}


def saved_groups(optimizer):
    """The param groups as torch.optim saves them: hyperparameters and param indices."""
    groups, index = [], 0
    for group in optimizer.param_groups:
        saved = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in group.items()
                 if k != "params"}
        saved["params"] = list(range(index, index + len(group["params"])))
        index += len(group["params"])
        groups.append(saved)
    return groups


def load_state_dict(optimizer, state_dict):
    groups = state_dict["param_groups"]
    if len(groups) != len(optimizer.param_groups):
        raise ValueError(f"state_dict: {len(groups)} param groups, the optimizer has "
                         f"{len(optimizer.param_groups)}")
    for gi, (group, saved) in enumerate(zip(optimizer.param_groups, groups)):
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(f"state_dict: group {gi} has {len(saved['params'])} params, the "
                             f"optimizer's has {len(group['params'])}")
        for key in UNSUPPORTED_OPTIONS:
            if saved.get(key):
                raise ValueError(f"state_dict: {key}=True is not supported by fusedopt")
    for group, saved in zip(optimizer.param_groups, groups):
        candidate = dict(group)
        for key, value in saved.items():
            if key in group and key not in ("params", "param_names"):
                candidate[key] = value.clone() if torch.is_tensor(value) else value
        optimizer.validate_group(candidate)
        group.update({k: v for k, v in candidate.items() if k != "params"})
    engine, algorithm = optimizer.engine, optimizer.algorithm
    with torch.no_grad():
        for group, saved in zip(optimizer.param_groups, groups):
            for p, index in zip(group["params"], saved["params"]):
                entry = state_dict["state"].get(index, {})
                engine.step_count(p).fill_(algorithm.load_step(entry))
                for name in algorithm.STATE:
                    value = entry.get(name)
                    target = engine.state_view(p, name)
                    if value is None:
                        engine.load_state(p, name, torch.zeros_like(target, dtype=torch.float32))
                        continue
                    value = distributed.local_value(p, value, f"{name} of {engine.names[p]}")
                    if value.shape != target.shape:
                        raise ValueError(f"state_dict: {name} of {engine.names[p]} has shape "
                                         f"{tuple(value.shape)}, expected {tuple(target.shape)}")
                    engine.load_state(p, name, value)
                remainder = engine.remainder_view(p)
                if remainder is not None:
                    value = entry.get(REMAINDER)
                    if value is None:
                        remainder.zero_()
                    else:
                        remainder.copy_(distributed.local_value(
                            p, value, f"{REMAINDER} of {engine.names[p]}"))


def fp32_model_state_dict(optimizer, model):
    """model.state_dict() with the optimizer's masters in place of their bf16 params."""
    engine, bits = optimizer.engine, optimizer.master_weight_bits
    masters = {}
    for p, _, _ in optimizer.entries():
        remainder = engine.remainder_view(p)
        if remainder is not None:
            local = distributed.local(p).detach()
            masters[p] = distributed.like_param(p, master.combine(local, remainder, bits))
    names = {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}
    state_dict = model.state_dict()
    for p, value in masters.items():
        if id(p) not in names:
            raise ValueError(f"fp32_model_state_dict: {optimizer.engine.names[p]} is not a "
                             "parameter of this model")
        state_dict[names[id(p)]] = value
    return state_dict


def load_fp32_model_state_dict(optimizer, model, state_dict):
    """Load fp32 (or any float) weights: params with a master take split(value)."""
    engine, bits = optimizer.engine, optimizer.master_weight_bits
    by_name = dict(model.named_parameters(remove_duplicate=False))
    optimized = {p for p, _, _ in optimizer.entries()}
    rest = {}
    with torch.no_grad():
        for name, value in state_dict.items():
            p = by_name.get(name)
            remainder = engine.remainder_view(p) if p in optimized else None
            if remainder is None:
                rest[name] = value
                continue
            if tuple(value.shape) != tuple(p.shape):
                raise ValueError(f"state_dict: {name} has shape {tuple(value.shape)}, the param "
                                 f"{tuple(p.shape)}")
            local_value = distributed.local_value(p, value.float(), name)
            param, low = master.split(local_value.to(remainder.device), bits)
            distributed.local(p).copy_(param)
            remainder.copy_(low)
    missing, unexpected = model.load_state_dict(rest, strict=False)
    loaded = set(state_dict)
    missing = [name for name in missing if name not in loaded]
    if missing or unexpected:
        raise ValueError(f"state_dict: missing {missing}, unexpected {unexpected}")
