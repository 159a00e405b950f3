"""The reference (backend="reference") against torch.optim, torch.amp.GradScaler and
clip_grad_norm_, in float64 where the math is compared, and against hand-computed AdamC/SGDC."""
import math

import pytest
import torch

import fusedopt
from fusedopt.reference import adam_reference, clip_coefficient, scaler_update_reference

SHAPES = [(1,), (127,), (278011,), (33, 17)]
STEPS = 32


def make_params(dtype=torch.float64, seed=0, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=dtype).requires_grad_() for s in shapes]


def clone_params(params):
    return [p.detach().clone().requires_grad_() for p in params]


def warmup_cosine(total, warmup=4):
    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
    return factor


def groups_for(params, kind, **overrides):
    """Two groups with different lr and decay; the last param never gets a gradient."""
    if kind == "adam":
        groups = [{"params": params[:2], "lr": 1e-2, "weight_decay": 0.1},
                  {"params": params[2:], "lr": 3e-3, "weight_decay": 0.0, "betas": (0.8, 0.99)}]
    else:
        groups = [{"params": params[:2], "lr": 1e-2, "weight_decay": 0.1, "momentum": 0.9},
                  {"params": params[2:], "lr": 3e-3, "weight_decay": 0.0, "momentum": 0.5,
                   "dampening": 0.1}]
    return [dict(g, **overrides) for g in groups]


def run_pair(kind, fused_kwargs=None, torch_kwargs=None, clip=None, steps=STEPS, **overrides):
    """Drive a fusedopt optimizer and its torch counterpart on identical gradients."""
    ours, theirs = make_params(), None
    theirs = clone_params(ours)
    fused_kwargs = fused_kwargs or {}
    torch_kwargs = torch_kwargs or {}
    if kind == "adam":
        opt = fusedopt.AdamW(groups_for(ours, kind, **overrides), backend="reference",
                             max_grad_norm=clip, **fused_kwargs)
        ref = torch.optim.AdamW(groups_for(theirs, kind, **overrides), foreach=False,
                                **torch_kwargs)
    else:
        opt = fusedopt.SGD(groups_for(ours, kind, **overrides), lr=1e-2, backend="reference",
                           max_grad_norm=clip, **fused_kwargs)
        ref = torch.optim.SGD(groups_for(theirs, kind, **overrides), lr=1e-2, foreach=False,
                              **torch_kwargs)
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, warmup_cosine(steps)) for o in (opt, ref)]
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for a, b in zip(ours[:-1], theirs[:-1]):
            grad = torch.randn(a.shape, generator=gen, dtype=a.dtype)
            a.grad, b.grad = grad.clone(), grad.clone()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(theirs, clip)
        opt.step()
        ref.step()
        for s in schedules:
            s.step()
    return ours, theirs, opt, ref


@pytest.mark.parametrize("kind", ["adam", "sgd"])
@pytest.mark.parametrize("clip", [None, 5.0])
def test_matches_torch_optim_float64(kind, clip):
    ours, theirs, opt, ref = run_pair(kind, clip=clip)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    # The param without a gradient is untouched and has no step, as in torch.
    assert torch.equal(ours[-1], make_params()[-1])
    assert float(opt.state[ours[-1]]["step"]) == 0
    for a, b in zip(ours[:-1], theirs[:-1]):
        for name in opt.MOMENTS:
            torch.testing.assert_close(opt.state[a][name], ref.state[b][name], atol=1e-12,
                                       rtol=1e-10)


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_nesterov_and_eps_match_torch(kind):
    if kind == "sgd":
        ours, theirs, *_ = run_pair(kind, nesterov=True, dampening=0.0)
    else:
        ours, theirs, *_ = run_pair(kind, eps=1e-6)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_adamc_decay_is_lr_squared_over_max_lr():
    """With zero gradients Adam's update is zero, so one step isolates the decay factor."""
    p = torch.full((4,), 2.0, dtype=torch.float64, requires_grad=True)
    opt = fusedopt.AdamC([p], lr=0.5, weight_decay=0.1, max_lr=2.0, backend="reference")
    p.grad = torch.zeros_like(p)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((4,), 2.0 * (1 - 0.5 * 0.1 * 0.5 / 2.0),
                                                      dtype=torch.float64))


def test_adamc_max_lr_defaults_to_initial_lr_and_follows_schedule():
    p = torch.full((3,), 1.0, dtype=torch.float64, requires_grad=True)
    opt = fusedopt.AdamC([p], lr=0.2, weight_decay=0.5, backend="reference")
    assert opt.param_groups[0]["max_lr"] == 0.2
    opt.param_groups[0]["lr"] = 0.05  # a scheduler at a quarter of the peak
    p.grad = torch.zeros_like(p)
    opt.step()
    expected = 1.0 * (1 - 0.05 * 0.5 * (0.05 / 0.2))
    torch.testing.assert_close(p.detach(), torch.full((3,), expected, dtype=torch.float64))


def test_sgdc_decay_coefficient():
    p = torch.full((3,), 1.0, dtype=torch.float64, requires_grad=True)
    opt = fusedopt.SGDC([p], lr=0.1, weight_decay=0.2, max_lr=0.4, backend="reference")
    p.grad = torch.full_like(p, 0.3)
    opt.step()
    # d = g + wd * (lr / max_lr) * p = 0.3 + 0.2 * 0.25 * 1; p -= lr * d
    torch.testing.assert_close(p.detach(), torch.full((3,), 1 - 0.1 * (0.3 + 0.05),
                                                      dtype=torch.float64))


def test_corrected_false_equals_plain_and_true_differs():
    base = make_params(shapes=[(50,)])
    results = []
    for cls in (fusedopt.AdamW, fusedopt.AdamC):
        params = clone_params(base)
        opt = cls(params, lr=1e-2, weight_decay=0.1, backend="reference")
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
        for step in range(5):
            params[0].grad = torch.ones_like(params[0]) * (step + 1)
            opt.step()
            sched.step()
        results.append(params[0].detach().clone())
    assert not torch.allclose(results[0], results[1])
    # corrected=True with a constant lr (k = 1) is plain AdamW.
    a, b = clone_params(base), clone_params(base)
    oa = fusedopt.AdamW(a, lr=1e-2, weight_decay=0.1, backend="reference")
    ob = fusedopt.AdamC(b, lr=1e-2, weight_decay=0.1, backend="reference")
    for step in range(3):
        a[0].grad = torch.ones_like(a[0])
        b[0].grad = torch.ones_like(b[0])
        oa.step()
        ob.step()
    assert torch.equal(a[0], b[0])


def test_grad_scaler_trajectory_matches_torch_amp():
    """fusedopt.GradScaler + AdamW vs torch.amp.GradScaler + torch AdamW with injected infs and
    growth; params, scale and skips must agree."""
    ours = make_params(dtype=torch.float32, shapes=[(64,), (7, 3)])
    theirs = clone_params(ours)
    opt = fusedopt.AdamW(ours, lr=1e-2, backend="reference")
    ref = torch.optim.AdamW(theirs, lr=1e-2, foreach=False)
    scaler = fusedopt.GradScaler(init_scale=256.0, growth_interval=3)
    ref_scaler = torch.amp.GradScaler("cpu", init_scale=256.0, growth_interval=3)
    gen = torch.Generator().manual_seed(3)
    for step in range(12):
        grads = [torch.randn(p.shape, generator=gen) for p in ours]
        if step in (2, 7):
            grads[step % 2].view(-1)[0] = float("inf") if step == 2 else float("nan")
        for params, s in ((ours, scaler), (theirs, ref_scaler)):
            loss = sum((p * g).sum() for p, g in zip(params, grads))
            s.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        ref_scaler.step(ref)
        ref_scaler.update()
        opt.zero_grad()
        ref.zero_grad()
        assert scaler.get_scale() == ref_scaler.get_scale()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)
    assert opt.stats().to_dict()["global"]["skipped_steps"] == 2


def test_clipping_matches_clip_grad_norm():
    ours = make_params(shapes=[(100,), (10, 10)])
    theirs = clone_params(ours)
    opt = fusedopt.SGD(ours, lr=0.1, backend="reference", max_grad_norm=0.5)
    ref = torch.optim.SGD(theirs, lr=0.1)
    for a, b in zip(ours, theirs):
        a.grad = torch.ones_like(a) * 3
        b.grad = torch.ones_like(b) * 3
    norm = torch.nn.utils.clip_grad_norm_(theirs, 0.5)
    opt.step()
    ref.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)
    g = opt.stats().to_dict()["global"]
    assert g["grad_norm"] == pytest.approx(float(norm))
    assert g["clip_coef"] == pytest.approx(clip_coefficient(float(norm), 0.5))


def test_stats_match_direct_computation():
    params = make_params(shapes=[(300,), (20, 5)])
    opt = fusedopt.AdamW(params, lr=1e-2, backend="reference", stats=True)
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        before = [p.detach().clone() for p in params]
        v_before = [opt.state[p]["exp_avg_sq"].clone() for p in params]
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        opt.step()
    stats = opt.stats().to_dict()
    for name, p, old, v_old in zip(opt.stats().names, params, before, v_before):
        s = stats["tensors"][name]
        vhat = opt.state[p]["exp_avg_sq"] / (1 - 0.999 ** 3)
        assert s["grad_norm"] == pytest.approx(p.grad.norm().item(), rel=1e-6)
        assert s["weight_norm"] == pytest.approx(p.detach().norm().item(), rel=1e-6)
        assert s["update_norm"] == pytest.approx((p.detach() - old).norm().item(), rel=1e-5)
        assert s["vhat_min"] == pytest.approx(vhat.min().item(), rel=1e-6)
        assert s["vhat_max"] == pytest.approx(vhat.max().item(), rel=1e-6)
        assert s["vhat_mean"] == pytest.approx(vhat.mean().item(), rel=1e-6)
        frac = (p.grad.square() < v_old).double().mean().item()
        assert s["v_decrease_frac"] == pytest.approx(frac, abs=1e-7)
    total = math.sqrt(sum(p.grad.norm().item() ** 2 for p in params))
    assert stats["global"]["grad_norm"] == pytest.approx(total, rel=1e-6)


def test_reference_functions_in_isolation():
    p = torch.tensor([1.0], dtype=torch.float64)
    m, v = torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    adam_reference(p, torch.tensor([2.0], dtype=torch.float64), m, v, step=1, lr=0.1,
                   beta1=0.9, beta2=0.999, eps=0.0, weight_decay=0.0)
    # First Adam step without eps moves every coordinate by exactly lr * sign(g).
    assert p.item() == pytest.approx(0.9)
    assert scaler_update_reference(8.0, 1, True, growth_factor=2, backoff_factor=0.5,
                                   growth_interval=3) == (4.0, 0)
    assert scaler_update_reference(8.0, 2, False, growth_factor=2, backoff_factor=0.5,
                                   growth_interval=3) == (16.0, 0)
    assert scaler_update_reference(8.0, 0, False, growth_factor=2, backoff_factor=0.5,
                                   growth_interval=3) == (8.0, 1)
