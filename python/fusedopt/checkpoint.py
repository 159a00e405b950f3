"""torch.optim-format state_dicts in and out of a fusedopt optimizer.

Out: per param, `step` as a CPU float32 tensor and copies of the state tensors, keyed by the
param's index in optimizer order, and the param groups with their hyperparameters, as
torch.optim.AdamW / SGD write them. Every param has an entry, also before its first step (step
0, zero state; torch.optim then has none, and loads such an entry to the same effect):
torch.distributed.checkpoint loads into the tensors of a fresh optimizer's state_dict, so those
must all be there. State of DTensor params (FSDP2) is saved as DTensors with the param's
placements. In: a fusedopt or torch.optim state_dict of the same algorithm and groups; DTensor
values are resharded to the param's placements, full tensors sliced to this rank's shard.
"""
from __future__ import annotations

import torch

from fusedopt import distributed

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
            entry[name] = distributed.like_param(p, engine.state_view(p, name).clone())
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
                        target.zero_()
                        continue
                    value = distributed.local_value(p, value, f"{name} of {engine.names[p]}")
                    if value.shape != target.shape:
                        raise ValueError(f"state_dict: {name} of {engine.names[p]} has shape "
                                         f"{tuple(value.shape)}, expected {tuple(target.shape)}")
                    target.copy_(value)
