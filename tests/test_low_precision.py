"""The low-precision tier: master weights for bf16 params (fusedopt/engine/master.py) and bf16
state with stochastic rounding (fusedopt/engine/stochastic.py). The encodings, trajectories
against fp32, the kernels against the reference, inf skip, checkpoints and refused settings."""
import math

import pytest
import torch

import fusedopt
from conftest import kernel_backends
from fusedopt.engine import master, stochastic
from tolerances import TOLERANCE

BF16 = torch.bfloat16


def bits32(x):
    return x.float().contiguous().view(torch.int32)


def rounded(m, bits):
    """The master value the optimizer keeps: m itself (32 bits) or m rounded to 24 bits."""
    return master.combine(*master.split(m, bits), bits)


def special_values():
    """Random magnitudes over 40 decades, exact ties with even and odd truncations, signed
    zeros, subnormals and values near the largest bf16."""
    gen = torch.Generator().manual_seed(0)
    spread = torch.randn(100_000, generator=gen) * torch.logspace(-20, 20, 100_000)
    high = torch.randint(0x3000, 0x4F00, (4000,), generator=gen).to(torch.int32)
    ties = ((high << 16) | 0x8000).view(torch.float32)
    edges = torch.tensor([0.0, -0.0, 1e-40, -1e-40, 1e-45, 3.3e38, -3.3e38])
    return torch.cat([spread, ties, -ties, edges])


# ----------------------------------------------------------------------------- the encoding
def test_32_bits_give_the_master_back_bit_for_bit():
    m = special_values()
    param, remainder = master.split(m, 32)
    assert param.dtype == BF16 and remainder.dtype == torch.int16
    assert torch.equal(bits32(master.combine(param, remainder, 32)), bits32(m))


def test_the_param_is_torchs_cast_except_at_exact_ties_rounded_away_from_zero():
    m = special_values()
    param, _ = master.split(m, 32)
    cast = m.to(BF16)
    differs = bits32(param) != bits32(cast)
    low17 = bits32(m) & 0x1FFFF
    # Ties (low 16 bits 0x8000) on an even truncation: torch rounds to even (down), the split
    # rounds away from zero (up), one bf16 ulp further out.
    assert torch.equal(differs, low17 == 0x8000)
    assert int(differs.sum()) > 1000
    assert torch.all(param[differs].float().abs() > cast[differs].float().abs())


def test_24_bits_keep_a_16_bit_significand():
    m = special_values()
    kept = rounded(m, 24)
    assert torch.equal(bits32(kept) & 0xFF, torch.zeros_like(bits32(kept)))
    normal = m.abs() > 1e-37
    error = ((kept.double() - m.double()).abs() / m.double().abs())[normal]
    assert error.max() <= 2.0 ** -16
    assert torch.equal(bits32(rounded(kept, 24)), bits32(kept))
    param, remainder = master.split(m, 24)
    assert remainder.dtype == torch.uint8
    assert torch.equal(bits32(param), bits32(master.split(kept, 32)[0]))


# ----------------------------------------------------------------------------- trajectories
STEPS = 200


def lr_at(step, peak=1e-3, floor=1e-6):
    """Cosine from peak down to floor over STEPS."""
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * step / (STEPS - 1)))


def run(dtype, bits, backend="reference", steps=STEPS, numel=3000, device="cpu", stats=False,
        state_dtype="fp32"):
    """AdamW on one tensor fed a fixed gradient sequence (the same bf16 values for every run)."""
    gen = torch.Generator().manual_seed(1)
    start = torch.randn(numel, generator=gen).to(BF16)
    grads = [torch.randn(numel, generator=gen).to(BF16) for _ in range(8)]
    p = torch.nn.Parameter(start.to(device, dtype))
    opt = fusedopt.AdamW([p], lr=lr_at(0), weight_decay=0.1, max_grad_norm=50.0,
                         backend=backend, master_weight_bits=bits, stats=stats,
                         state_dtype=state_dtype)
    for step in range(steps):
        opt.param_groups[0]["lr"] = lr_at(step)
        p.grad = grads[step % len(grads)].to(device, dtype)
        opt.step()
    return p, opt


def test_32_bit_masters_follow_the_fp32_trajectory_bit_for_bit_where_bf16_stalls():
    fp32, _ = run(torch.float32, None)
    with_master, opt = run(BF16, 32)
    plain, _ = run(BF16, None)
    masters = master.combine(with_master.detach(), opt.engine.remainder_view(with_master), 32)
    assert torch.equal(bits32(masters), bits32(fp32.detach()))
    assert torch.equal(with_master.detach(), master.split(fp32.detach(), 32)[0])
    # The plain bf16 run: the last 50 updates (lr below 6e-5) are under half a bf16 ulp for
    # most elements and are lost; its params end far from the fp32 ones.
    before_tail, _ = run(BF16, None, steps=STEPS - 50)
    frozen = (plain.detach() == before_tail.detach()).float().mean()
    moved = (fp32.detach().to(BF16) != plain.detach()).float().mean()
    assert frozen > 0.5 and moved > 0.5, (frozen, moved)


def test_24_bit_masters_stay_close_to_the_fp32_trajectory():
    fp32, _ = run(torch.float32, None)
    with_master, opt = run(BF16, 24)
    plain, _ = run(BF16, None)
    masters = master.combine(with_master.detach(), opt.engine.remainder_view(with_master), 24)
    error24 = (masters - fp32.detach()).abs().max()
    error_bf16 = (plain.detach().float() - fp32.detach()).abs().max()
    assert error24 < error_bf16 / 20, (error24, error_bf16)


@pytest.mark.parametrize("bits", [32, 24])
def test_kernels_match_the_reference(kernel_backend, device, bits):
    results = {}
    for backend in ("reference", kernel_backend):
        p, opt = run(BF16, bits, backend, steps=3, numel=9000, device=device, stats=True)
        results[backend] = (master.combine(p.detach(), opt.engine.remainder_view(p), bits),
                            p.detach().clone(), opt.stats().to_dict()["tensors"]["param0"])
    (ref_master, ref_param, ref_stats), (master_k, param_k, stats_k) = results.values()
    # An fp32 update one rounding apart (the kernels' fused multiply-adds and fp32 betas) can
    # round to neighbouring 24-bit masters: one step of a 16-bit significand (on the H200,
    # 17 of 9000 elements).
    tolerance = TOLERANCE[torch.float32] if bits == 32 else {"rtol": 2.0 ** -15, "atol": 1e-6}
    torch.testing.assert_close(master_k, ref_master, **tolerance)
    # Each side's param is its own master split: the param follows the master, not torch's cast.
    assert torch.equal(param_k, master.split(master_k, bits)[0])
    assert torch.equal(ref_param, master.split(ref_master, bits)[0])
    for field in ("weight_norm", "update_norm", "vhat_max"):
        assert stats_k[field] == pytest.approx(ref_stats[field], rel=1e-5), field


@pytest.mark.parametrize("backend", ["reference"] + kernel_backends())
def test_an_inf_leaves_params_remainders_and_state_bit_identical(backend, device):
    p, opt = run(BF16, 32, backend, steps=3, numel=5000, device=device)
    before = {k: v.clone() for k, v in opt.state[p].items()}
    param_before = p.detach().clone()
    p.grad = torch.full_like(p, float("inf"))
    opt.step()
    assert opt.stats().to_dict()["global"]["found_inf"]
    assert torch.equal(p.detach(), param_before)
    for key, value in before.items():
        assert torch.equal(opt.state[p][key], value), key


# ----------------------------------------------------------------------------- checkpoints
def tiny_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 2))
    model[2].to(BF16)
    model[0].to(BF16)
    return model


def train(model, opt, steps, start=0):
    for step in range(start, start + steps):
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(step))
        h = model[0](x.to(BF16)).float()
        out = model[2](model[1](h).to(BF16)).float()
        opt.zero_grad()
        out.square().mean().backward()
        opt.step()


def test_state_dict_round_trip_continues_bit_exactly():
    model = tiny_model()
    opt = fusedopt.AdamW(model.parameters(), lr=1e-3, master_weight_bits=32)
    train(model, opt, 3)
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved_opt = opt.state_dict()
    assert saved_opt["state"][0][fusedopt.checkpoint.REMAINDER].dtype == torch.int16
    assert fusedopt.checkpoint.REMAINDER not in saved_opt["state"][2]  # fp32 LayerNorm weight
    train(model, opt, 3, start=3)
    again = tiny_model()
    again_opt = fusedopt.AdamW(again.parameters(), lr=1e-3, master_weight_bits=32)
    again.load_state_dict(saved_model)
    again_opt.load_state_dict(saved_opt)
    train(again, again_opt, 3, start=3)
    for a, b in zip(model.parameters(), again.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(opt.state.values(), again_opt.state.values()):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_fp32_model_state_dict_holds_the_masters_and_loads_back():
    model = tiny_model()
    opt = fusedopt.AdamW(model.parameters(), lr=1e-3, master_weight_bits=32)
    train(model, opt, 4)
    fp32 = opt.fp32_model_state_dict(model)
    weight = model[0].weight
    expected = master.combine(weight.detach(), opt.engine.remainder_view(weight), 32)
    assert fp32["0.weight"].dtype == torch.float32
    assert torch.equal(fp32["0.weight"], expected)
    assert not torch.equal(fp32["0.weight"], weight.detach().float())  # the low bits are there
    assert torch.equal(fp32["1.weight"], model[1].weight.detach())     # fp32 params as they are
    fresh = tiny_model()
    fresh_opt = fusedopt.AdamW(fresh.parameters(), lr=1e-3, master_weight_bits=32)
    fresh_opt.load_fp32_model_state_dict(fresh, fp32)
    assert fresh[0].weight.dtype == BF16
    for name, value in fresh_opt.fp32_model_state_dict(fresh).items():
        assert torch.equal(value, fp32[name]), name


def test_a_torch_checkpoint_loads_with_masters_equal_to_the_params():
    model = tiny_model()
    theirs = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train(model, theirs, 2)
    opt = fusedopt.AdamW(model.parameters(), lr=1e-3, master_weight_bits=32)
    train(model, opt, 1)  # remainders become nonzero
    opt.load_state_dict(theirs.state_dict())
    weight = model[0].weight
    assert torch.equal(opt.engine.remainder_view(weight), torch.zeros_like(weight, dtype=torch.int16))


# ----------------------------------------------------------------------------- refused input
def test_bad_settings_are_named():
    p = torch.nn.Parameter(torch.ones(3, dtype=BF16))
    with pytest.raises(ValueError, match="master_weight_bits must be None, 24 or 32, got 16"):
        fusedopt.AdamW([p], master_weight_bits=16)
    half = torch.nn.Parameter(torch.ones(3, dtype=torch.float16))
    with pytest.raises(ValueError, match="params: param1 is float16"):
        fusedopt.AdamW([p, half], master_weight_bits=32)
    with pytest.raises(ValueError, match=r"state_dtype must be one of \('fp32', 'bf16', 'int8'\), "
                                         "got 'int4'"):
        fusedopt.AdamW([p], state_dtype="int4")
    double = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="params: param0 is float64; state_dtype='bf16'"):
        fusedopt.AdamW([double], state_dtype="bf16")


# ----------------------------------------------------------------------------- bf16 state
def test_stochastic_rounding_is_unbiased_and_lands_on_a_neighbour():
    x = torch.full((200_000,), 1.0 + 3 * 2.0 ** -10)  # 3/8 of the way from 1 to 1 + 2^-7
    rounded = stochastic.to_bf16(x, step=7, index=torch.arange(x.numel()), stream=1).float()
    assert set(rounded.unique().tolist()) == {1.0, 1.0 + 2.0 ** -7}
    up = (rounded > 1.0).double().mean().item()
    assert abs(up - 0.375) < 0.005  # binomial sd 0.0011
    assert rounded.double().mean().item() == pytest.approx(x[0].item(), rel=1e-4)


def test_the_random_bits_depend_on_step_index_and_stream_only():
    index = torch.arange(10_000)
    a = stochastic.random16(3, index, 1)
    assert torch.equal(a, stochastic.random16(3, index, 1))
    for other in (stochastic.random16(4, index, 1), stochastic.random16(3, index, 2),
                  stochastic.random16(3, index + 1, 1)):
        assert (a == other).float().mean() < 0.01
    assert 0 <= int(a.min()) and int(a.max()) <= 0xFFFF
    assert abs(a.double().mean().item() / 0xFFFF - 0.5) < 0.01


def test_bf16_state_tracks_the_fp32_moments():
    fp32, fp32_opt = run(torch.float32, None)
    sr, sr_opt = run(torch.float32, None, state_dtype="bf16")
    v32 = fp32_opt.state[fp32]["exp_avg_sq"]
    v16 = sr_opt.state[sr]["exp_avg_sq"]
    assert v16.dtype == BF16
    # Each step's stochastic rounding adds an error of mean 0 and sd at most half a bf16 ulp
    # (2^-8 relative); carried through v's average, the errors add like a random walk, so after
    # n steps the RMS relative error is at most 2^-8 * sqrt(n) (5.5% at 200; measured 1.7%),
    # while their mean, the bias, stays near 0 (measured 0.04%). Rounding to nearest instead
    # would drop v's 0.1% steps whenever they are under half an ulp.
    relative = (v16.float() - v32) / v32
    assert relative.square().mean().sqrt() < 2.0 ** -8 * math.sqrt(STEPS)
    assert abs(relative.mean().item()) < 2.0 ** -10
    torch.testing.assert_close(sr.detach(), fp32.detach(), rtol=0, atol=2e-3)


def test_kernels_match_the_reference_with_bf16_state(kernel_backend, device):
    results = []
    for backend in ("reference", kernel_backend):
        p, opt = run(BF16, 32, backend, steps=3, numel=9000, device=device, state_dtype="bf16")
        results.append((master.combine(p.detach(), opt.engine.remainder_view(p), 32),
                        {k: v.clone() for k, v in opt.state[p].items()}))
    (ref_master, ref_state), (master_k, state_k) = results
    torch.testing.assert_close(master_k, ref_master, **TOLERANCE[torch.float32])
    for name in ("exp_avg", "exp_avg_sq"):
        # The same random bits: the stored values agree except where the fp32 values, which
        # differ by the kernels' fp32 betas (1e-5 relative on 1 - beta2) and their fp32 block
        # sums of the clipping norm, fall on either side of a rounding boundary (0.2% of v's
        # elements; one bf16 ulp apart then). Such an element carries its ulp into the next
        # step, whose rounding can add another: two ulps over these 3 steps (seen for 1 element
        # of 9000 on an H200).
        same = (state_k[name] == ref_state[name]).float().mean()
        assert same > 0.99, (name, same)
        torch.testing.assert_close(state_k[name].float(), ref_state[name].float(), rtol=2 ** -6,
                                   atol=0)


def test_an_inf_leaves_bf16_state_bit_identical(kernel_backend, device):
    p, opt = run(torch.float32, None, kernel_backend, steps=2, numel=5000, device=device,
                 state_dtype="bf16")
    before = {k: v.clone() for k, v in opt.state[p].items()}
    p.grad = torch.full_like(p, float("nan"))
    opt.step()
    for key, value in before.items():
        assert torch.equal(opt.state[p][key], value), key


def test_bf16_state_checkpoints_and_takes_torch_checkpoints():
    model = tiny_model()
    theirs = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train(model, theirs, 2)
    opt = fusedopt.AdamW(model.parameters(), lr=1e-3, state_dtype="bf16")
    opt.load_state_dict(theirs.state_dict())
    weight = model[0].weight
    assert opt.state[weight]["exp_avg"].dtype == BF16
    assert torch.equal(opt.state[weight]["exp_avg"],
                       theirs.state[weight]["exp_avg"].to(BF16))
    saved = opt.state_dict()
    train(model, opt, 1)
    opt.load_state_dict(saved)
    assert torch.equal(opt.state[weight]["exp_avg"], saved["state"][0]["exp_avg"])


# ----------------------------------------------------------------------------- to_bf16
def test_to_bf16_keeps_norms_in_fp32_behind_casting_hooks():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.LayerNorm(8), torch.nn.GELU(),
                                torch.nn.Linear(8, 3))
    fusedopt.to_bf16(model)
    assert model.fp32_modules == ["1"]
    assert model[0].weight.dtype == BF16 and model[3].weight.dtype == BF16
    assert model[1].weight.dtype == torch.float32
    out = model(torch.randn(4, 6, dtype=BF16))
    assert out.dtype == BF16
    out.float().square().mean().backward()
    assert all(p.grad.dtype == p.dtype for p in model.parameters())


def test_to_bf16_on_a_transformers_llama_trains_with_32_bit_masters():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      vocab_size=64, max_position_embeddings=32, use_cache=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    fusedopt.to_bf16(model, keep_fp32=lambda name, m: fusedopt.precision.is_norm(name, m)
                     or name == "lm_head")
    assert "lm_head" in model.fp32_modules and "model.norm" in model.fp32_modules
    assert model.lm_head.weight.dtype == torch.float32
    assert model.model.layers[0].mlp.up_proj.weight.dtype == BF16
    opt = fusedopt.AdamW(model.parameters(), lr=1e-3, master_weight_bits=32)
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(3):
        loss = model(input_ids=tokens, labels=tokens).loss
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert opt.engine.remainder_view(model.model.layers[0].mlp.up_proj.weight) is not None
    assert opt.engine.remainder_view(model.lm_head.weight) is None  # fp32: its own master


@pytest.mark.parametrize("cls, kwargs", [(fusedopt.SGD, {"momentum": 0.9, "nesterov": True}),
                                         (fusedopt.Lion, {"lr": 1e-4})], ids=["SGD", "Lion"])
def test_sgd_and_lion_take_the_tier_on_the_kernels_as_in_the_reference(kernel_backend, device,
                                                                       cls, kwargs):
    gen = torch.Generator().manual_seed(3)
    start = torch.randn(5000, generator=gen).to(BF16)
    grads = [torch.randn(5000, generator=gen).to(BF16) for _ in range(3)]
    results = []
    for backend in ("reference", kernel_backend):
        p = torch.nn.Parameter(start.clone().to(device))
        opt = cls([p], weight_decay=0.1, backend=backend, master_weight_bits=32,
                  state_dtype="bf16", **({"lr": 1e-2} | kwargs))
        for g in grads:
            p.grad = g.to(device)
            opt.step()
        results.append((master.combine(p.detach(), opt.engine.remainder_view(p), 32),
                        next(iter(v for k, v in opt.state[p].items() if k != "step"
                                  and v.dtype == BF16))))
    (ref_master, ref_state), (master_k, state_k) = results
    torch.testing.assert_close(master_k, ref_master, **TOLERANCE[torch.float32])
    assert (state_k == ref_state).float().mean() > 0.99


# ----------------------------------------------------------------------------- what users do
def test_masters_survive_deepcopy_add_param_group_and_a_rebuild():
    import copy
    p, opt = run(BF16, 32, steps=5, numel=300)
    remainder = opt.engine.remainder_view(p).clone()
    assert remainder.abs().sum() > 0
    twin = copy.deepcopy(opt)
    twin_p = twin.param_groups[0]["params"][0]
    assert torch.equal(twin.engine.remainder_view(twin_p), remainder)
    # A new group rebuilds the layout: the masters' low bits follow their params.
    opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(7, dtype=BF16))]})
    assert torch.equal(opt.engine.remainder_view(p), remainder)
    assert torch.equal(opt.state[p]["master_remainder"], remainder)
    assert torch.equal(opt.state_dict()["state"][0]["master_remainder"], remainder)


def test_bf16_state_is_bit_reproducible_run_to_run():
    a, opt_a = run(torch.float32, None, steps=20, state_dtype="bf16")
    b, opt_b = run(torch.float32, None, steps=20, state_dtype="bf16")
    assert torch.equal(a, b)
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(opt_a.state[a][key], opt_b.state[b][key])


def test_model_float_after_construction_gives_each_param_its_master():
    p, opt = run(BF16, 32, steps=5, numel=300)
    masters = master.combine(p.detach(), opt.engine.remainder_view(p), 32)
    with torch.no_grad():
        p.data = p.data.float()
    p.grad = torch.zeros_like(p)
    opt.param_groups[0]["lr"] = 0.0  # a step that changes nothing, after the rebuild
    opt.step()
    assert p.dtype == torch.float32 and opt.engine.remainder_view(p) is None
    assert torch.equal(p.detach(), masters)
    assert not torch.equal(p.detach(), masters.to(BF16).float())
