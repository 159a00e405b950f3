"""torch.optim-format state_dicts in and out of a fusedopt optimizer.

Out: per param, `step` as a CPU float32 tensor and copies of the state tensors, keyed by the
param's index in optimizer order, and the param groups with their hyperparameters, exactly as
torch.optim.AdamW / SGD write them; params that never stepped have no entry (torch creates state
at the first step). In: a fusedopt or torch.optim state_dict of the same algorithm and groups.
"""
from __future__ import annotations

import torch

# Options of torch.optim groups that fusedopt does not implement: a checkpoint that sets one
# would train differently here, so it is refused.
UNSUPPORTED_OPTIONS = ("amsgrad", "maximize", "differentiable")


def state_dict(optimizer):
    engine, names = optimizer.engine, optimizer.algorithm.STATE
    entries = list(optimizer.entries())
    steps = {p: float(engine.step_count(p)) for p, _, _ in entries}
    state = {}
    for index, (p, _, _) in enumerate(entries):
        if steps[p] == 0:
            continue
        entry = {"step": torch.tensor(steps[p], dtype=torch.float32)}
        for name in names:
            entry[name] = engine.state_view(p, name).clone()
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
                    elif value.shape != target.shape:
                        raise ValueError(f"state_dict: {name} of {engine.names[p]} has shape "
                                         f"{tuple(value.shape)}, expected {tuple(target.shape)}")
                    else:
                        target.copy_(value)
