"""Kernel backends (Triton, CUDA) against the reference backend, through the optimizers.

Both sides get the same params and gradients; after every step params, moments, step counts,
global figures and statistics must agree within the dtype's tolerance (tests/tolerances.py).
On CPU the Triton kernels run under TRITON_INTERPRET=1 (tests/conftest.py).
"""
import itertools

import pytest
import torch

import fusedopt
from cases import CASES
from tolerances import TOLERANCE

# Sizes that do not divide BLOCK = 4096, one that spans blocks, and a 2-D tensor.
SHAPES = [(1,), (127,), (4097,), (33, 65)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make(case, backend, device, dtype, *, corrected=False, clip=None, stats=True, shapes=SHAPES,
         seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).to(device=device, dtype=dtype).requires_grad_()
              for s in shapes]
    cls = case.corrected if corrected else case.fused
    opt = cls(case.groups(params), max_grad_norm=clip, backend=backend, stats=stats,
              **case.defaults)
    return params, opt


def set_grads(params, gen, grad_dtype=None):
    """Gradients drawn in fp32 and rounded to grad_dtype (default: each param's dtype)."""
    for p in params:
        grad = torch.randn(p.shape, generator=gen).to(grad_dtype or p.dtype)
        p.grad = grad.to(device=p.device, dtype=p.dtype)


def state_of(params, opt):
    return [[p.detach().float()] + [opt.state[p][n].float() for n in opt.algorithm.STATE] for p in params]


def assert_same_state(a_params, a_opt, b_params, b_opt, dtype, truth=None):
    """fp32: kernel vs reference within TOLERANCE. Half types, as flash-attention judges them:
    the kernel's error against an fp32-storage run (`truth`) is at most twice the same-dtype
    reference's plus one ulp, since each step may round a stored value either way."""
    for a, b in zip(a_params, b_params):
        assert float(a_opt.state[a]["step"]) == float(b_opt.state[b]["step"])
    ours, ref = state_of(a_params, a_opt), state_of(b_params, b_opt)
    if truth is None:
        for xs, ys in zip(ours, ref):
            for x, y in zip(xs, ys):
                torch.testing.assert_close(x, y, **TOLERANCE[dtype])
        return
    ulp = torch.finfo(dtype).eps
    for xs, ys, zs in zip(ours, ref, truth):
        for x, y, z in zip(xs, ys, zs):
            kernel_error = (x - z).abs().max().item()
            reference_error = (y - z).abs().max().item()
            assert kernel_error <= 2 * reference_error + ulp * z.abs().max().item(), (
                kernel_error, reference_error)


def assert_same_stats(a_opt, b_opt, dtype):
    a, b = a_opt.stats().to_dict(), b_opt.stats().to_dict()
    for key in ("grad_norm", "clip_coef"):
        assert a["global"][key] == pytest.approx(b["global"][key], rel=1e-5)
    for key in ("found_inf", "skipped_steps", "loss_scale"):
        assert a["global"][key] == b["global"][key]
    rel = 1e-4 if dtype == torch.float32 else 2e-2
    for name in a["tensors"]:
        for key, value in a["tensors"][name].items():
            expected = b["tensors"][name][key]
            if key == "update_norm" and dtype != torch.float32:
                # A one-ulp difference in a stored half value is a large relative change of
                # a small update; compare against the weight scale instead.
                assert value == pytest.approx(expected, abs=rel * a["tensors"][name]["weight_norm"])
            elif key == "v_decrease_frac":
                assert value == pytest.approx(expected, abs=2e-2 if dtype != torch.float32 else 1e-3,
                                              nan_ok=True)
            else:
                # A tensor without elements has NaN means (0 / 0, as torch's mean of nothing).
                assert value == pytest.approx(expected, rel=rel, abs=1e-12, nan_ok=True), (name, key)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("corrected,clip", [(False, None), (True, 0.5)])
def test_matches_reference(kernel_backend, device, case, dtype, corrected, clip):
    runs = [make(case, kernel_backend, device, dtype, corrected=corrected, clip=clip),
            make(case, "reference", device, dtype, corrected=corrected, clip=clip)]
    if dtype != torch.float32:
        truth_params, truth_opt = make(case, "reference", device, torch.float32,
                                       corrected=corrected, clip=clip)
        with torch.no_grad():
            for p, q in zip(truth_params, runs[0][0]):
                p.copy_(q.float())
        runs.append((truth_params, truth_opt))
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1 + s)) for _, o in runs]
    generators = [torch.Generator().manual_seed(1) for _ in runs]
    for _ in range(4):
        for (params, opt), gen, schedule in zip(runs, generators, schedules):
            set_grads(params, gen, grad_dtype=dtype)
            opt.step()
            schedule.step()
        truth = state_of(*runs[2]) if len(runs) == 3 else None
        assert_same_state(*runs[0], *runs[1], dtype, truth)
    assert_same_stats(runs[0][1], runs[1][1], dtype)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_stats_off_gives_the_same_params(kernel_backend, device, case):
    a_params, a_opt = make(case, kernel_backend, device, torch.float32, stats=True)
    b_params, b_opt = make(case, kernel_backend, device, torch.float32, stats=False)
    gen_a, gen_b = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    for _ in range(2):
        set_grads(a_params, gen_a)
        set_grads(b_params, gen_b)
        a_opt.step()
        b_opt.step()
    for a, b in zip(a_params, b_params):
        assert torch.equal(a, b)
    assert "weight_norm" not in b_opt.stats().per_tensor
    assert torch.equal(a_opt.stats().per_tensor["grad_norm"], b_opt.stats().per_tensor["grad_norm"])


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("where", [0, 2])
def test_nonfinite_grad_leaves_everything_bit_identical(kernel_backend, device, case, bad,
                                                         where):
    params, opt = make(case, kernel_backend, device, torch.float32, clip=1.0)
    gen = torch.Generator().manual_seed(4)
    set_grads(params, gen)
    opt.step()
    before = [p.detach().clone() for p in params]
    moments = [{n: opt.state[p][n].clone() for n in opt.algorithm.STATE} for p in params]
    steps = [float(opt.state[p]["step"]) for p in params]
    set_grads(params, gen)
    params[where].grad.view(-1)[-1] = bad
    opt.step()
    for p, old, m, step in zip(params, before, moments, steps):
        assert torch.equal(p.detach(), old)
        for name in opt.algorithm.STATE:
            assert torch.equal(opt.state[p][name], m[name])
        assert float(opt.state[p]["step"]) == step
    g = opt.stats().to_dict()["global"]
    assert g["found_inf"] and g["skipped_steps"] == 1
    # The norm of a step with an inf/NaN is reported as it is, not hidden.
    assert not torch.isfinite(torch.tensor(g["grad_norm"]))


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_a_skipped_steps_statistics_match_the_reference(kernel_backend, device, case):
    """A step with an inf reports the state as it stands (weight norms, v-hat, the momentum's
    norm) as the reference does, over a tensor of a full block and a tail."""
    runs = [make(case, backend, device, torch.float32, clip=1.0)
            for backend in (kernel_backend, "reference")]
    for params, opt in runs:
        gen = torch.Generator().manual_seed(5)
        set_grads(params, gen)
        opt.step()
        set_grads(params, gen)
        params[0].grad.view(-1)[-1] = float("inf")
        opt.step()
        assert opt.stats().to_dict()["global"]["skipped_steps"] == 1
    assert_same_stats(runs[0][1], runs[1][1], torch.float32)


def test_fused_scaler_matches_reference_scaler(kernel_backend, device):
    """fusedopt.GradScaler's scale trajectory (backoff on inf, growth) in the fused finalize."""
    runs = []
    for backend in (kernel_backend, "reference"):
        params, opt = make(CASES["adamw"], backend, device, torch.float16, clip=1.0)
        scaler = fusedopt.GradScaler(init_scale=1024.0, growth_interval=2)
        gen = torch.Generator().manual_seed(6)
        scales = []
        for step in range(7):
            loss = sum((p.float() * torch.randn(p.shape, generator=gen).to(device)).sum()
                       for p in params)
            if step == 3:
                loss = loss * float("inf")
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
            scales.append(scaler.get_scale())
        runs.append((params, opt, scales))
    (a_params, a_opt, a_scales), (b_params, b_opt, b_scales) = runs
    assert a_scales == b_scales
    assert [float(a_opt.state[p]["step"]) for p in a_params] == [6.0] * len(a_params)
    for a, b in zip(a_params, b_params):
        torch.testing.assert_close(a_opt.state[a]["exp_avg"], b_opt.state[b]["exp_avg"],
                                   **TOLERANCE[torch.float16])


def test_two_runs_are_bit_identical(kernel_backend, device):
    results = []
    for _ in range(2):
        params, opt = make(CASES["adamw"], kernel_backend, device, torch.float32, clip=0.5,
                           shapes=[(5000,), (4096 * 3 + 1,), (7,)])
        gen = torch.Generator().manual_seed(8)
        for _ in range(3):
            set_grads(params, gen)
            opt.step()
        stats = opt.stats()
        results.append(([p.detach().clone() for p in params],
                        {k: v.clone() for k, v in stats.per_tensor.items()}))
    (pa, sa), (pb, sb) = results
    assert all(torch.equal(a, b) for a, b in zip(pa, pb))
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0, equal_nan=True)


def test_mixed_dtypes_share_one_clip_norm(kernel_backend, device):
    """One optimizer over fp32 and bf16 params: two segments, one global norm."""
    def build(backend):
        gen = torch.Generator().manual_seed(9)
        a = torch.randn(300, generator=gen).to(device).requires_grad_()
        b = torch.randn(200, generator=gen).to(device=device, dtype=torch.bfloat16).requires_grad_()
        opt = fusedopt.AdamW([a, b], lr=1e-2, max_grad_norm=0.1, backend=backend, stats=True)
        a.grad = torch.full_like(a, 0.5)
        b.grad = torch.full_like(b, -0.25)
        opt.step()
        return opt
    ours, ref = build(kernel_backend), build("reference")
    assert len(next(iter(ours.engine.devices.values())).segments) == 2
    expected = (300 * 0.25 + 200 * 0.0625) ** 0.5
    assert ours.stats().to_dict()["global"]["grad_norm"] == pytest.approx(expected, rel=1e-6)
    assert_same_stats(ours, ref, torch.bfloat16)


def test_blocks_find_their_tensor_past_empty_ones_in_every_segment(kernel_backend, device):
    """Tensors without elements first, between others and last, in the fp32 segment and in the
    bf16 one (whose tensors start at a column past the fp32 ones): each kernel block finds its
    own tensor, so the kernels take the reference's step and norms."""
    numels = {torch.float32: [0, 4096 + 7, 0, 0, 3 * 4096, 0],
              torch.bfloat16: [0, 0, 4096, 0, 2 * 4096 + 300]}

    def build(backend):
        gen = torch.Generator().manual_seed(4)
        params = [torch.randn(n, generator=gen).to(device=device, dtype=dtype).requires_grad_()
                  for dtype, sizes in numels.items() for n in sizes]
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(device=device, dtype=p.dtype)
        opt = fusedopt.AdamW(params, lr=1e-2, max_grad_norm=1.0, backend=backend, stats=True)
        opt.step()
        return params, opt

    (ours, opt), (ref, ref_opt) = build(kernel_backend), build("reference")
    assert len(next(iter(opt.engine.devices.values())).segments) == 2
    for i, (a, b) in enumerate(zip(ours, ref)):
        torch.testing.assert_close(a.detach().float().cpu(), b.detach().float().cpu(),
                                   **TOLERANCE[a.dtype], msg=f"param {i}")
    assert_same_stats(opt, ref_opt, torch.bfloat16)


def test_every_flag_combination_runs_against_reference(kernel_backend, device):
    """corrected x clip x stats x scaler on a small problem: one step each."""
    for corrected, clip, stats, scaled in itertools.product([False, True], [None, 0.3],
                                                            [False, True], [False, True]):
        outcomes = []
        for backend in (kernel_backend, "reference"):
            params, opt = make(CASES["adamw"], backend, device, torch.float32, corrected=corrected,
                               clip=clip, stats=stats, shapes=[(130,), (9,)])
            gen = torch.Generator().manual_seed(10)
            if scaled:
                scaler = fusedopt.GradScaler(init_scale=8.0)
                loss = sum((p * torch.randn(p.shape, generator=gen).to(device)).sum() for p in params)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                set_grads(params, gen)
                opt.step()
            outcomes.append((params, opt))
        (a_params, a_opt), (b_params, b_opt) = outcomes
        assert_same_state(a_params, a_opt, b_params, b_opt, torch.float32)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_zero_gradient_coordinates_match_the_reference(kernel_backend, device, case):
    """Exact zeros in the gradient (frozen embedding rows, masked positions): Lion's sign(0) = 0
    leaves such a coordinate to the decay alone, and every algorithm must agree with the
    reference there."""
    runs = [make(case, backend, device, torch.float32) for backend in (kernel_backend, "reference")]
    for params, opt in runs:
        gen = torch.Generator().manual_seed(11)
        for _ in range(2):
            set_grads(params, gen)
            for p in params:
                p.grad.view(-1)[::2] = 0.0
            opt.step()
    assert_same_state(*runs[0], *runs[1], torch.float32)
