"""SGD / SGDC test cases: torch.optim.SGD is the truth."""
import torch

import fusedopt

NAME = "sgd"


def groups(params):
    """Momentum with decay, then momentum with dampening and no decay."""
    return [{"params": params[:2], "lr": 1e-2, "weight_decay": 0.1, "momentum": 0.9},
            {"params": params[2:], "lr": 3e-3, "weight_decay": 0.0, "momentum": 0.5,
             "dampening": 0.1}]


def truth(param_groups):
    return torch.optim.SGD(param_groups, lr=1e-2, foreach=False)


CASE = dict(name=NAME, fused=fusedopt.SGD, corrected=fusedopt.SGDC, groups=groups, truth=truth,
            defaults=dict(lr=1e-2))
