"""The reference (backend="reference") against torch.optim (and a plain PyTorch Lion), torch.amp.GradScaler and
clip_grad_norm_, in float64 where the math is compared, and against hand-computed AdamC/SGDC."""
import math

import pytest
import torch

import fusedopt
from cases import CASES
from fusedopt.algorithms import adamw
from fusedopt.engine.reference import clip_coefficient, scaler_update

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


def run_pair(case, clip=None, steps=STEPS, **overrides):
    """Drive a fusedopt optimizer (reference backend) and its truth on identical gradients;
    the last param never gets a gradient."""
    ours = make_params()
    theirs = clone_params(ours)
    opt = case.fused([dict(g, **overrides) for g in case.groups(ours)], backend="reference",
                     max_grad_norm=clip, **case.defaults)
    ref = case.truth([dict(g, **overrides) for g in case.groups(theirs)])
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


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("clip", [None, 5.0])
def test_matches_truth_float64(case, clip):
    ours, theirs, opt, ref = run_pair(case, clip=clip)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    # The param without a gradient is untouched and has no step, as in torch.
    assert torch.equal(ours[-1], make_params()[-1])
    assert float(opt.state[ours[-1]]["step"]) == 0
    for a, b in zip(ours[:-1], theirs[:-1]):
        for name in opt.algorithm.STATE:
            torch.testing.assert_close(opt.state[a][name], ref.state[b][name], atol=1e-12,
                                       rtol=1e-10)


@pytest.mark.parametrize("name,overrides", [("sgd", dict(nesterov=True, dampening=0.0)),
                                            ("adamw", dict(eps=1e-6))])
def test_nesterov_and_eps_match_torch(name, overrides):
    ours, theirs, *_ = run_pair(CASES[name], **overrides)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_lion_first_step_moves_every_coordinate_by_lr():
    """With a zero state and no decay, c = (1 - b1) * g: every coordinate moves by exactly lr
    against the sign of its gradient, and zero gradients do not move."""
    p = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64, requires_grad=True)
    opt = fusedopt.Lion([p], lr=0.25, backend="reference")
    p.grad = torch.tensor([3.0, -1e-9, 0.0], dtype=torch.float64)
    opt.step()
    assert p.detach().tolist() == [0.75, 1.25, 1.0]
    torch.testing.assert_close(opt.state[p]["exp_avg"], 0.01 * p.grad)


@pytest.mark.parametrize("cls", [fusedopt.AdamC, fusedopt.LionC], ids=lambda c: c.__name__)
def test_corrected_decay_is_lr_squared_over_max_lr(cls):
    """With zero gradients (and so a zero state) the update is zero, so one step isolates the
    decay factor."""
    p = torch.full((4,), 2.0, dtype=torch.float64, requires_grad=True)
    opt = cls([p], lr=0.5, weight_decay=0.1, max_lr=2.0, backend="reference")
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
    adamw.reference_update(p, torch.tensor([2.0], dtype=torch.float64),
                           {"exp_avg": m, "exp_avg_sq": v}, step=1, lr=0.1, beta1=0.9,
                           beta2=0.999, eps=0.0, weight_decay=0.0)
    # First Adam step without eps moves every coordinate by exactly lr * sign(g).
    assert p.item() == pytest.approx(0.9)
    assert scaler_update(8.0, 1, True, growth_factor=2, backoff_factor=0.5,
                         growth_interval=3) == (4.0, 0)
    assert scaler_update(8.0, 2, False, growth_factor=2, backoff_factor=0.5,
                         growth_interval=3) == (16.0, 0)
    assert scaler_update(8.0, 0, False, growth_factor=2, backoff_factor=0.5,
                         growth_interval=3) == (8.0, 1)
    # As torch: a growth that overflows fp32 keeps the scale (and resets the tracker).
    assert scaler_update(3e38, 2, False, growth_factor=2, backoff_factor=0.5,
                         growth_interval=3) == (3e38, 0)
