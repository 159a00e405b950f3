"""Lion / LionC test cases. torch has no Lion: the truth is PlainLion below, the paper's
Algorithm 2 (Chen et al. 2023, arXiv 2302.06675) written out in plain PyTorch, one tensor at a
time and independently of fusedopt's code."""
import torch

import fusedopt

NAME = "lion"


class PlainLion(torch.optim.Optimizer):
    """c = b1*m + (1-b1)*g; p -= lr*(sign(c) + wd*p); m = b2*m + (1-b2)*g."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                    state["step"] = torch.tensor(0.0)
                state["step"] += 1
                m = state["exp_avg"]
                c = beta1 * m + (1 - beta1) * p.grad
                p.sub_(group["lr"] * (c.sign() + group["weight_decay"] * p))
                m.mul_(beta2).add_((1 - beta2) * p.grad)


def groups(params):
    """Decay with the paper's betas, then other betas and no decay."""
    return [{"params": params[:2], "lr": 1e-3, "weight_decay": 0.5},
            {"params": params[2:], "lr": 3e-4, "weight_decay": 0.0, "betas": (0.95, 0.98)}]


def truth(param_groups):
    return PlainLion(param_groups)


CASE = dict(name=NAME, fused=fusedopt.Lion, corrected=fusedopt.LionC, groups=groups,
            truth=truth, defaults=dict(lr=1e-3))
