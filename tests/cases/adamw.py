"""AdamW / AdamC test cases: torch.optim.AdamW is the truth."""
import torch

import fusedopt

NAME = "adamw"


def groups(params):
    """The first group decays; the second has other betas and no decay."""
    return [{"params": params[:2], "lr": 1e-2, "weight_decay": 0.1},
            {"params": params[2:], "lr": 3e-3, "weight_decay": 0.0, "betas": (0.8, 0.99)}]


def truth(param_groups):
    return torch.optim.AdamW(param_groups, foreach=False)


CASE = dict(name=NAME, fused=fusedopt.AdamW, corrected=fusedopt.AdamC, groups=groups,
            truth=truth, defaults=dict(lr=1e-2))
