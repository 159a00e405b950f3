"""Training-health figures derived from the fused step's per-tensor statistics.

Everything except `preconditioned_sharpness` works on a `fusedopt.StepStats` (or any object with
`names`, `per_tensor` and `numel` laid out the same way): torch ops on the statistics' device, no
pass over parameters or gradients and no host sync until the caller reads a value.

- `block_sharpness`: the per-block-type sharpness proxy of Wang et al. 2025 (arXiv 2502.19002).
- `grad_heterogeneity`: spread of per-tensor (and per-block) gradient norms, after Tomihari & Sato
  2025 (arXiv 2502.00213), with the precise definitions below.
- `SpikeMonitor`: the beta2-decay precursor of Adam loss spikes (Bai et al. 2025, arXiv 2506.04805).
- `preconditioned_sharpness`: the exact (expensive) check of the same paper, by Hessian-vector
  products and power iteration, for small models.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from .blocks import BLOCK_TYPES, tensor_block_index

_INDEX_CACHE: dict[tuple, tuple[torch.Tensor, tuple[str, ...]]] = {}


def _block_index(names: Sequence[str], types: Mapping[str, str], device) -> tuple[torch.Tensor, tuple[str, ...]]:
    """Per-tensor block index on `device` and the block types present, cached so repeated calls
    do no host-to-device copy."""
    key = (tuple(names), tuple(types.get(n, "Other") for n in names), str(device))
    hit = _INDEX_CACHE.get(key)
    if hit is None:
        idx = tensor_block_index(names, types, device=device)
        present = tuple(t for t in BLOCK_TYPES if t in set(key[1]))
        hit = (idx, present)
        if len(_INDEX_CACHE) > 64:
            _INDEX_CACHE.clear()
        _INDEX_CACHE[key] = hit
    return hit


def _active(grad_norm: torch.Tensor) -> torch.Tensor:
    # A tensor with an exactly zero gradient had no gradient this step (or a dead parameter);
    # non-finite norms come from a skipped (inf/NaN) step. Neither says anything about spread.
    return torch.isfinite(grad_norm) & (grad_norm > 0)


@dataclass
class BlockFigures:
    """Per-block-type figures as device tensors, one entry per type in `types` (BLOCK_TYPES order)."""

    types: tuple[str, ...]
    sharpness: torch.Tensor  # B * sum ||g||^2 / sum numel over the block's tensors
    grad_rms: torch.Tensor  # sqrt(sum ||g||^2 / sum numel): per-element gradient RMS of the block
    numel: torch.Tensor

    def ordering(self) -> list[str]:
        """Block types from the flattest to the sharpest (reads the device: syncs)."""
        values = self.sharpness.tolist()
        return [t for _, t in sorted(zip(values, self.types))]

    def to_dict(self) -> dict[str, float]:
        return dict(zip(self.types, self.sharpness.tolist()))


def block_sharpness(stats, types: Mapping[str, str], batch_size: int) -> BlockFigures:
    """Sharpness proxy per block type: S(b) = B * sum_{t in b} ||g_t||^2 / sum_{t in b} numel_t.

    ||g_t|| is the step's per-tensor gradient norm (unscaled, before clipping) and B the number
    of sequences (or examples) the gradient averages over. For a mean loss, B * E||g_B||^2 ~
    Tr(F) (the gradient covariance dominates ||E g||^2 late in training), so S(b) estimates the
    average diagonal of the Fisher / Gauss-Newton matrix of block b: Wang et al.'s
    Tr(H_b) / |b| estimate. Tensors with a zero or non-finite norm are left out.
    `types` maps stats.names to block types (fusedopt.blocks.classify).
    """
    g = stats.per_tensor["grad_norm"].float()
    device = g.device
    idx, present = _block_index(stats.names, types, device)
    numel = stats.numel.to(device=device, dtype=torch.float64)
    active = _active(g)
    g2 = torch.where(active, g.double() ** 2, torch.zeros((), dtype=torch.float64, device=device))
    n = torch.where(active, numel, torch.zeros((), dtype=torch.float64, device=device))
    sum_g2 = torch.zeros(len(BLOCK_TYPES), dtype=torch.float64, device=device).index_add_(0, idx, g2)
    sum_n = torch.zeros(len(BLOCK_TYPES), dtype=torch.float64, device=device).index_add_(0, idx, n)
    sel = torch.tensor([BLOCK_TYPES.index(t) for t in present], device=device) if present else idx[:0]
    mean_g2 = sum_g2[sel] / sum_n[sel]
    return BlockFigures(types=present, sharpness=(batch_size * mean_g2).float(),
                        grad_rms=mean_g2.sqrt().float(), numel=sum_n[sel])


def _ratio_cv(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """max/min and population coefficient of variation (std/mean, ddof 0) of x over mask."""
    inf = torch.full((), math.inf, dtype=x.dtype, device=x.device)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    count = mask.sum().to(x.dtype)
    hi = torch.where(mask, x, -inf).max()
    lo = torch.where(mask, x, inf).min()
    mean = torch.where(mask, x, zero).sum() / count
    var = torch.where(mask, (x - mean) ** 2, zero).sum() / count
    return hi / lo, var.sqrt() / mean


def grad_heterogeneity(stats, types: Mapping[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Gradient heterogeneity of one step, as 0-d device tensors (float64).

    Over the T tensors with a finite, nonzero gradient norm n_t = ||g_t|| (numel N_t):
      norm_ratio = max_t n_t / min_t n_t
      norm_cv    = std_t(n_t) / mean_t(n_t)             (population std)
      rms_ratio, rms_cv: the same for r_t = n_t / sqrt(N_t), the per-element gradient RMS, which
                 removes the trivial effect of tensor size (a 4d x d FFN matrix vs a d-vector).
    With `types` (classify's map), also per block type b with R_b = sqrt(sum_b n_t^2 / sum_b N_t):
      block_rms_ratio = max_b R_b / min_b R_b,  block_rms_cv = std_b(R_b) / mean_b(R_b).
    Tomihari & Sato 2025 describe heterogeneity as the disparity of gradient norms among
    parameter blocks without a single formula; these are the figures we report.
    """
    n = stats.per_tensor["grad_norm"].double()
    numel = stats.numel.to(device=n.device, dtype=torch.float64)
    mask = _active(n)
    out = {}
    out["norm_ratio"], out["norm_cv"] = _ratio_cv(n, mask)
    out["rms_ratio"], out["rms_cv"] = _ratio_cv(n / numel.sqrt(), mask)
    if types is not None:
        figures = block_sharpness(stats, types, batch_size=1)
        r = figures.grad_rms.double()
        out["block_rms_ratio"], out["block_rms_cv"] = _ratio_cv(r, torch.isfinite(r) & (r > 0))
    return out


class SpikeMonitor:
    """Per-tensor watch for the beta2-decay regime that precedes Adam loss spikes.

    Bai et al. 2025 (arXiv 2506.04805): when g^2 << v on most coordinates, v decays as beta2^k,
    the preconditioner 1/(sqrt(v-hat)+eps) grows, and once the preconditioned curvature along
    the gradient passes 2/lr the loss spikes. The fused step reports, per tensor, the fraction of
    coordinates whose v decreased (v_decrease_frac) and the smallest v-hat (vhat_min), so each
    step the monitor forms
        frac_t = v_decrease_frac_t,     step_t = lr_t / (sqrt(vhat_min_t) + eps_t)
    (step_t: the largest per-coordinate step size in tensor t) and the condition
        c_t = frac_t >= decay_frac  and  step_t >= step_growth * ref_t
    where ref_t is an exponential average (rate ref_ema) of step_t over the steps on which
    frac_t < decay_frac (the healthy regime; frozen while the tensor decays; the first step's
    value before any healthy step). A tensor is flagged once c_t has held for `patience`
    consecutive steps. For zero-mean Gaussian gradients with v = E g^2 the decreasing fraction is
    P(|z| < 1) = 0.68, so a sustained fraction >= 0.9 means the gradients have shrunk relative to
    v, not noise. All state lives on the statistics' device; update() never syncs.
    """

    def __init__(self, optimizer=None, *, decay_frac: float = 0.9, step_growth: float = 1.0,
                 patience: int = 10, ref_ema: float = 0.9):
        if not 0.0 <= decay_frac <= 1.0:
            raise ValueError(f"decay_frac must be in [0, 1], got {decay_frac}")
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        if not 0.0 <= ref_ema < 1.0:
            raise ValueError(f"ref_ema must be in [0, 1), got {ref_ema}")
        self.optimizer = optimizer
        self.decay_frac = decay_frac
        self.step_growth = step_growth
        self.patience = patience
        self.ref_ema = ref_ema
        self.steps = 0
        self.names: list[str] | None = None
        self.run: torch.Tensor | None = None  # consecutive steps with the condition, per tensor
        self.ref: torch.Tensor | None = None
        self.flagged: torch.Tensor | None = None  # bool: condition held >= patience steps now
        self.first_flag: torch.Tensor | None = None  # int64: update count of the first flag, -1 none
        self.frac: torch.Tensor | None = None
        self.max_step: torch.Tensor | None = None
        self._gidx_key = None
        self._gidx: torch.Tensor | None = None

    def _group_index(self, names: Sequence[str], device) -> torch.Tensor:
        """Param-group index of each statistics entry, cached on the device.

        Statistics are ordered by the optimizer's flat buffers (device, then dtype), which is the
        group order only for a single-dtype model, so entries are matched to groups by name when
        the groups carry names (torch.optim's "param_names", set for named parameters)."""
        key = (tuple(names), str(device))
        if self._gidx_key != key:
            by_name, order = {}, []
            for gi, group in enumerate(self.optimizer.param_groups):
                for name in group.get("param_names") or [None] * len(group["params"]):
                    order.append(gi)
                    if name is not None:
                        by_name[name] = gi
            idx = [by_name[n] if n in by_name else order[i] for i, n in enumerate(names)]
            self._gidx = torch.tensor(idx, dtype=torch.int64, device=device)
            self._gidx_key = key
        return self._gidx

    def _per_tensor_hyper(self, key: str, names: Sequence[str], device) -> torch.Tensor:
        # One fill kernel per group from the Python value (no host-to-device copy, no sync),
        # so a scheduler's lr is picked up every step.
        values = []
        for g in self.optimizer.param_groups:
            v = g[key]
            values.append(v.detach().reshape(1).to(device=device, dtype=torch.float32)
                          if torch.is_tensor(v) else torch.full((1,), float(v), device=device))
        return torch.cat(values)[self._group_index(names, device)]

    def update(self, stats, lr: float | torch.Tensor | None = None,
               eps: float | torch.Tensor | None = None) -> torch.Tensor:
        """Feed one step's statistics; returns the per-tensor flag (bool device tensor).

        lr and eps default to the optimizer's current per-group values (so a scheduler is
        followed); pass them (scalar or per-tensor) when the monitor has no optimizer.
        Tensors without a gradient this step (NaN statistics) break their run and leave their
        reference unchanged.
        """
        frac = stats.per_tensor["v_decrease_frac"].float()
        vmin = stats.per_tensor["vhat_min"].float()
        device = frac.device
        if lr is None or eps is None:
            if self.optimizer is None:
                raise ValueError("lr and eps are required when SpikeMonitor has no optimizer")
            lr = self._per_tensor_hyper("lr", stats.names, device) if lr is None else lr
            eps = self._per_tensor_hyper("eps", stats.names, device) if eps is None else eps
        step = lr / (vmin.clamp_min(0).sqrt() + eps)
        if self.run is None or self.run.numel() != frac.numel():
            self.names = list(stats.names)
            self.run = torch.zeros(frac.shape, dtype=torch.int64, device=device)
            self.ref = step.clone()
            self.first_flag = torch.full(frac.shape, -1, dtype=torch.int64, device=device)
        self.steps += 1
        decaying = frac >= self.decay_frac
        healthy = ~decaying & torch.isfinite(step)
        ref = torch.where(torch.isfinite(self.ref), self.ref, step)
        self.ref = torch.where(healthy, self.ref_ema * ref + (1 - self.ref_ema) * step, ref)
        cond = decaying & (step >= self.step_growth * self.ref)
        self.run = torch.where(cond, self.run + 1, torch.zeros_like(self.run))
        self.flagged = self.run >= self.patience
        self.first_flag = torch.where(self.flagged & (self.first_flag < 0),
                                      torch.full_like(self.first_flag, self.steps), self.first_flag)
        self.frac, self.max_step = frac, step
        return self.flagged

    def flagged_names(self) -> list[str]:
        """Names of the tensors flagged at the last update (reads the device: syncs)."""
        if self.flagged is None:
            return []
        return [n for n, f in zip(self.names, self.flagged.tolist()) if f]

    def any_flagged(self) -> torch.Tensor:
        """0-d bool device tensor: any tensor flagged at the last update."""
        return self.flagged.any()


@dataclass
class PreconditionedSharpness:
    """Result of preconditioned_sharpness (host floats).

    lambda_max: largest-magnitude eigenvalue of P H (P H and the symmetric P^1/2 H P^1/2 share
        eigenvalues), P = diag(lr_i/lr / ((1 - beta1^t) (sqrt(v-hat) + eps))).
    grad_curvature: (P g)^T H (P g) / (g^T P g), the curvature of the loss along Adam's
        preconditioned step direction measured in the preconditioned metric: the loss decreases
        along -lr P g to second order iff lr * grad_curvature < 2.
    threshold: 2 / lr, the classical stability threshold Bai et al. compare both against.
    threshold_momentum: (2 + 2 beta1) / ((1 - beta1) lr), the threshold for EMA-momentum
        Adam (Cohen et al. 2022, arXiv 2207.14484), reported for reference.
    """

    lambda_max: float
    grad_curvature: float
    threshold: float
    threshold_momentum: float
    lr: float
    iters: int


def preconditioned_sharpness(model: torch.nn.Module, loss_fn: Callable, batch, optimizer,
                             iters: int = 20, seed: int = 0) -> PreconditionedSharpness:
    """lambda_max and the gradient-direction curvature of Adam's preconditioned Hessian.

    loss_fn(model, batch) -> scalar loss. Hessian-vector products by double backward through
    autograd (2 extra backward passes per iteration), power iteration on P^1/2 H P^1/2.
    P = diag(1 / ((1 - beta1^t) (sqrt(v-hat) + eps))) per parameter from the optimizer's
    state (exp_avg_sq, step) and its group's betas, eps; the 1/(1 - beta1^t) factor is Adam's
    first-moment bias correction, part of the effective step lr / (1 - beta1^t) (Bai et al.
    2025 include it; it is ~1 after a few hundred steps). With groups at different lrs the
    ratio lr_i / lr (lr = the first group's lr) is folded into P, so the result is still
    compared with 2 / lr. Power iteration converges to the largest-magnitude eigenvalue; near
    a minimum that is the largest positive one. The model's mode (train/eval) is left as is.
    Works with any optimizer whose state has torch.optim's Adam keys (fusedopt or torch.optim).
    """
    params, pre, lr_ref, beta1_ref = [], [], None, None
    for group in optimizer.param_groups:
        beta1, beta2 = group["betas"]
        lr = float(group["lr"])
        if lr_ref is None:
            lr_ref, beta1_ref = lr, beta1
        for item in group["params"]:
            p = item[1] if isinstance(item, tuple) else item
            state = optimizer.state.get(p, {})
            if not p.requires_grad or "exp_avg_sq" not in state:
                continue
            t = float(state["step"])
            vhat = state["exp_avg_sq"].to(p.dtype) / (1 - beta2 ** t)
            pre.append((lr / lr_ref) / ((1 - beta1 ** t) * (vhat.sqrt() + group["eps"])))
            params.append(p)
    if not params:
        raise ValueError("optimizer has no Adam state (exp_avg_sq) yet: take at least one step first")
    sqrt_pre = [q.sqrt() for q in pre]

    loss = loss_fn(model, batch)
    grads = torch.autograd.grad(loss, params, create_graph=True)

    def hvp(vs):
        # A parameter can enter the gradient linearly (a last-layer bias): its Hessian row is zero.
        return torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=True,
                                   allow_unused=True, materialize_grads=True)

    def sym(xs):  # P^1/2 H P^1/2 x
        return [s * h for s, h in zip(sqrt_pre, hvp([s * x for s, x in zip(sqrt_pre, xs)]))]

    def dot(a, b):
        return sum((x * y).sum() for x, y in zip(a, b))

    gen = torch.Generator(device="cpu").manual_seed(seed)
    xs = [torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device) for p in params]
    norm = dot(xs, xs).sqrt()
    xs = [x / norm for x in xs]
    lam = torch.zeros(())
    for _ in range(iters):
        ys = sym(xs)
        lam = dot(xs, ys)
        norm = dot(ys, ys).sqrt()
        xs = [y / norm for y in ys]

    g = [gr.detach() for gr in grads]
    pg = [q * gi for q, gi in zip(pre, g)]
    curv = dot(pg, hvp(pg)) / dot(g, pg)
    return PreconditionedSharpness(
        lambda_max=float(lam), grad_curvature=float(curv), threshold=2.0 / lr_ref,
        threshold_momentum=(2 + 2 * beta1_ref) / ((1 - beta1_ref) * lr_ref), lr=lr_ref, iters=iters)
