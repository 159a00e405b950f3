"""Derived figures vs direct computation, SpikeMonitor on synthetic sequences, and the exact
preconditioned sharpness vs an explicit float64 Hessian."""

import math
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

from fusedopt.blocks import classify
from fusedopt.diagnostics import (SpikeMonitor, block_sharpness, grad_heterogeneity,
                                  preconditioned_sharpness)


@dataclass
class DirectStats:
    """The StepStats fields the diagnostics read, computed directly from tensors."""

    names: list
    per_tensor: dict = field(default_factory=dict)
    numel: torch.Tensor = None


def direct_grad_stats(named_params):
    names = [n for n, _ in named_params]
    norms = torch.stack([p.grad.float().norm() if p.grad is not None else torch.zeros(())
                         for _, p in named_params])
    numel = torch.tensor([p.numel() for _, p in named_params], dtype=torch.int64)
    return DirectStats(names, {"grad_norm": norms}, numel)


class TinyLM(nn.Module):
    """Embedding -> norm -> q/k/v/o + MLP -> head: one parameter of each block type."""

    def __init__(self, vocab=11, d=6):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.ln = nn.LayerNorm(d)
        self.attn = nn.ModuleDict({n: nn.Linear(d, d) for n in ("q_proj", "k_proj", "v_proj", "o_proj")})
        self.mlp = nn.ModuleDict({"up_proj": nn.Linear(d, 2 * d), "down_proj": nn.Linear(2 * d, d)})
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, x):
        h = self.ln(self.wte(x))
        a = self.attn
        w = torch.softmax(a["q_proj"](h) @ a["k_proj"](h).transpose(-1, -2), dim=-1)
        h = h + a["o_proj"](w @ a["v_proj"](h))
        h = h + self.mlp["down_proj"](torch.relu(self.mlp["up_proj"](h)))
        return self.lm_head(h)


def lm_grads(seed=0, batch=4):
    torch.manual_seed(seed)
    model = TinyLM()
    x = torch.randint(0, 11, (batch, 5))
    nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
    return model


def test_block_sharpness_matches_direct():
    model = lm_grads()
    types = classify(model)
    named = list(model.named_parameters())
    stats = direct_grad_stats(named)
    figures = block_sharpness(stats, types, batch_size=4)
    assert figures.types == ("Emb", "QK", "VO", "FFN", "Norm", "Head")
    for t, s in zip(figures.types, figures.sharpness.tolist()):
        g = torch.cat([p.grad.double().flatten() for n, p in named if types[n] == t])
        assert s == pytest.approx(4 * (g ** 2).sum().item() / g.numel(), rel=1e-5)
    ordering = figures.ordering()
    assert sorted(ordering) == sorted(figures.types)
    values = figures.to_dict()
    assert [values[t] for t in ordering] == sorted(values.values())


def test_block_sharpness_skips_gradless_tensors():
    model = lm_grads()
    model.attn["q_proj"].weight.grad = None
    named = list(model.named_parameters())
    types = classify(model)
    figures = block_sharpness(direct_grad_stats(named), types, batch_size=1)
    qk = torch.cat([p.grad.double().flatten() for n, p in named
                    if types[n] == "QK" and p.grad is not None])
    assert figures.to_dict()["QK"] == pytest.approx((qk ** 2).mean().item(), rel=1e-5)


def test_grad_heterogeneity_matches_direct():
    model = lm_grads(seed=1)
    named = list(model.named_parameters())
    stats = direct_grad_stats(named)
    stats.per_tensor["grad_norm"][2] = 0.0  # a tensor without a gradient is left out
    h = grad_heterogeneity(stats, classify(model))
    keep = [i for i in range(len(named)) if i != 2]
    n = stats.per_tensor["grad_norm"].double()[keep]
    r = n / stats.numel.double()[keep].sqrt()
    assert h["norm_ratio"].item() == pytest.approx((n.max() / n.min()).item(), rel=1e-9)
    assert h["norm_cv"].item() == pytest.approx((n.std(unbiased=False) / n.mean()).item(), rel=1e-9)
    assert h["rms_ratio"].item() == pytest.approx((r.max() / r.min()).item(), rel=1e-9)
    assert h["rms_cv"].item() == pytest.approx((r.std(unbiased=False) / r.mean()).item(), rel=1e-9)
    rms = block_sharpness(stats, classify(model), batch_size=1).grad_rms.double()
    assert h["block_rms_ratio"].item() == pytest.approx((rms.max() / rms.min()).item(), rel=1e-9)
    assert h["block_rms_cv"].item() == pytest.approx((rms.std(unbiased=False) / rms.mean()).item(), rel=1e-9)
    assert all(v.dim() == 0 for v in h.values())


def spike_sequence(healthy=20, decaying=30, recover=5, beta2=0.99):
    """Tensor 0: healthy (frac 0.5, v-hat 1), then beta2 decay (frac 0.95, v-hat *= beta2), then
    healthy again. Tensor 1: healthy throughout."""
    steps = []
    vmin = 1.0
    for k in range(healthy + decaying + recover):
        phase_decay = healthy <= k < healthy + decaying
        vmin = vmin * beta2 if phase_decay else 1.0
        frac = torch.tensor([0.95 if phase_decay else 0.5, 0.6])
        steps.append(DirectStats(["a", "b"], {"v_decrease_frac": frac, "vhat_min": torch.tensor([vmin, 1.0])},
                                 torch.tensor([10, 10])))
    return steps


def test_spike_monitor_flags_after_patience_and_resets():
    mon = SpikeMonitor(decay_frac=0.9, step_growth=1.0, patience=10)
    flags = [mon.update(s, lr=0.1, eps=1e-8).clone() for s in spike_sequence()]
    first = [k for k, f in enumerate(flags) if f[0]]
    # the first decaying step is index 20; the condition holds from there, so the flag rises on
    # its 10th consecutive step and falls when the tensor recovers at index 50.
    assert first == list(range(29, 50))
    assert not any(f[1] for f in flags)
    assert mon.first_flag.tolist() == [30, -1]  # update count (1-based)
    assert mon.flagged_names() == []


def test_spike_monitor_step_growth_threshold():
    beta2 = 0.99
    mon = SpikeMonitor(decay_frac=0.9, step_growth=1.05, patience=3, ref_ema=0.0)
    flags = [mon.update(s, lr=1.0, eps=0.0)[0].item() for s in spike_sequence(beta2=beta2)]
    # ref = the last healthy step's value 1/sqrt(1) = 1; after k decaying steps the step is
    # beta2^(-k/2), past 1.05 from k = ceil(2 ln 1.05 / -ln beta2) = 10 on.
    k0 = math.ceil(2 * math.log(1.05) / -math.log(beta2))
    assert flags.index(True) == 20 + (k0 - 1) + (3 - 1)


def test_spike_monitor_reads_optimizer_lr_and_eps():
    p1, p2 = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2))
    opt = torch.optim.Adam([{"params": [p1], "lr": 0.1, "eps": 1e-3}, {"params": [p2], "lr": 0.01}])
    mon = SpikeMonitor(opt, patience=1)
    stats = DirectStats(["p1", "p2"], {"v_decrease_frac": torch.tensor([1.0, 0.0]),
                                       "vhat_min": torch.tensor([4.0, 9.0])}, torch.tensor([3, 2]))
    flagged = mon.update(stats)
    assert mon.max_step.tolist() == pytest.approx([0.1 / (2 + 1e-3), 0.01 / (3 + 1e-8)])
    assert flagged.tolist() == [True, False]
    assert mon.flagged_names() == ["p1"]
    with pytest.raises(ValueError, match="lr and eps"):
        SpikeMonitor().update(stats)


def tiny_regression(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(16, 3, dtype=torch.float64)
    y = torch.randn(16, 2, dtype=torch.float64)
    return model, (x, y)


def mse(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


@pytest.mark.parametrize("two_groups", [False, True])
def test_preconditioned_sharpness_vs_explicit_hessian(two_groups):
    model, batch = tiny_regression()
    params = list(model.parameters())
    groups = ([{"params": params[:2], "lr": 0.05}, {"params": params[2:], "lr": 0.02}]
              if two_groups else [{"params": params, "lr": 0.05}])
    opt = torch.optim.Adam(groups, betas=(0.9, 0.95), eps=1e-6)
    for _ in range(7):
        opt.zero_grad()
        mse(model, batch).backward()
        opt.step()

    result = preconditioned_sharpness(model, mse, batch, opt, iters=300)

    shapes = [p.shape for p in params]
    flat0 = torch.cat([p.detach().flatten() for p in params])

    def loss_of_flat(flat):
        tensors, i = [], 0
        for s in shapes:
            n = math.prod(s)
            tensors.append(flat[i:i + n].view(s))
            i += n
        names = [n for n, _ in model.named_parameters()]
        return mse(lambda x: torch.func.functional_call(model, dict(zip(names, tensors)), (x,)), batch)

    hessian = torch.func.hessian(loss_of_flat)(flat0)
    grad = torch.func.grad(loss_of_flat)(flat0)
    pre = []
    for g in opt.param_groups:
        b1, b2 = g["betas"]
        for p in g["params"]:
            st = opt.state[p]
            t = float(st["step"])
            vhat = st["exp_avg_sq"] / (1 - b2 ** t)
            pre.append((g["lr"] / 0.05) / ((1 - b1 ** t) * (vhat.sqrt() + g["eps"])).flatten())
    pre = torch.cat(pre)
    sym = pre.sqrt()[:, None] * hessian * pre.sqrt()[None, :]
    eig = torch.linalg.eigvalsh(sym)
    top = eig[eig.abs().argmax()].item()
    assert abs(eig[-1].item()) > 1.5 * abs(eig[-2].item())  # a gap, so 300 iterations converge
    assert result.lambda_max == pytest.approx(top, rel=1e-8)
    pg = pre * grad
    assert result.grad_curvature == pytest.approx((pg @ hessian @ pg / (grad @ pg)).item(), rel=1e-9)
    assert result.threshold == pytest.approx(2 / 0.05)
    assert result.threshold_momentum == pytest.approx(3.8 / (0.1 * 0.05))


def test_preconditioned_sharpness_needs_state():
    model, batch = tiny_regression()
    opt = torch.optim.Adam(model.parameters())
    with pytest.raises(ValueError, match="exp_avg_sq"):
        preconditioned_sharpness(model, mse, batch, opt)


def test_figures_from_real_fused_stats():
    """The derived figures from fusedopt's own opt.stats() match direct computation."""
    adam = pytest.importorskip("fusedopt.adam")
    model = lm_grads(seed=2)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt = adam.AdamW(list(model.named_parameters()), lr=1e-2, stats=True)
    for n, p in model.named_parameters():
        p.grad = grads[n].clone()
    opt.step()
    stats = opt.stats()
    types = classify(model)
    figures = block_sharpness(stats, types, batch_size=4)
    for t, s in zip(figures.types, figures.sharpness.tolist()):
        g = torch.cat([grads[n].double().flatten() for n in grads if types[n] == t])
        assert s == pytest.approx(4 * (g ** 2).mean().item(), rel=1e-5)
    n = torch.stack([grads[name].double().norm() for name in stats.names])
    h = grad_heterogeneity(stats)
    assert h["norm_ratio"].item() == pytest.approx((n.max() / n.min()).item(), rel=1e-5)
    mon = SpikeMonitor(opt, patience=1)
    mon.update(stats)
    vmin = torch.stack([opt.state[p]["exp_avg_sq"].min() / (1 - 0.999) for p in model.parameters()])
    expected = 1e-2 / (vmin.sqrt() + 1e-8)
    order = [name for name, _ in model.named_parameters()]
    got = dict(zip(stats.names, mon.max_step.tolist()))
    assert [got[k] for k in order] == pytest.approx(expected.tolist(), rel=1e-4)
