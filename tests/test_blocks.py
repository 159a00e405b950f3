"""Block classification and parameter groups on models built from transformers' configs
(tiny sizes, no downloads) and on plain torch modules."""

import pytest
import torch
from torch import nn

from fusedopt.blocks import BLOCK_TYPES, SHARPNESS_LR_MULTIPLIERS, classify, param_groups

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


def gpt2(n_layer=2):
    cfg = transformers.GPT2Config(n_embd=16, n_layer=n_layer, n_head=2, vocab_size=64, n_positions=16,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def llama(tie=False):
    cfg = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, vocab_size=64,
                                   tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(cfg)


def by_type(types):
    out = {}
    for name, t in types.items():
        out.setdefault(t, set()).add(name)
    return out


def test_gpt2_every_parameter_classified():
    model = gpt2()
    types = classify(model)
    assert list(types) == [n for n, _ in model.named_parameters()]
    groups = by_type(types)
    assert groups["Emb"] == {"transformer.wte.weight", "transformer.wpe.weight"}
    for i in range(2):
        h = f"transformer.h.{i}."
        assert types[h + "attn.c_attn.weight"] == "QKV"
        assert types[h + "attn.c_attn.bias"] == "QKV"
        assert types[h + "attn.c_proj.weight"] == "VO"
        assert types[h + "mlp.c_fc.weight"] == "FFN"
        assert types[h + "mlp.c_proj.weight"] == "FFN"
        assert types[h + "mlp.c_proj.bias"] == "FFN"
        assert types[h + "ln_1.weight"] == types[h + "ln_2.bias"] == "Norm"
    assert types["transformer.ln_f.weight"] == "Norm"
    assert "Other" not in groups and "Head" not in groups


def test_gpt2_tied_embedding_is_emb_and_uncorrected():
    model = gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    types = classify(model)
    assert "lm_head.weight" not in types  # torch deduplicates the tied Parameter
    assert types["transformer.wte.weight"] == "Emb"
    groups = param_groups(model, 1e-3, 0.1, corrected=True)
    (emb,) = [g for g in groups if g["block"] == "Emb"]
    assert not emb["corrected"] and emb["weight_decay"] == 0.1


def test_llama_every_parameter_classified():
    model = llama()
    types = classify(model)
    assert list(types) == [n for n, _ in model.named_parameters()]
    for i in range(2):
        pre = f"model.layers.{i}."
        assert types[pre + "self_attn.q_proj.weight"] == types[pre + "self_attn.k_proj.weight"] == "QK"
        assert types[pre + "self_attn.v_proj.weight"] == types[pre + "self_attn.o_proj.weight"] == "VO"
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert types[pre + f"mlp.{proj}.weight"] == "FFN"
        assert types[pre + "input_layernorm.weight"] == "Norm"  # LlamaRMSNorm, by class name
        assert types[pre + "post_attention_layernorm.weight"] == "Norm"
    assert types["model.norm.weight"] == "Norm"
    assert types["model.embed_tokens.weight"] == "Emb"
    assert types["lm_head.weight"] == "Head"


def test_llama_tied():
    model = llama(tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    types = classify(model)
    assert types["model.embed_tokens.weight"] == "Emb"
    assert "Head" not in types.values()


def test_torch_modules_and_unknowns():
    class Mystery(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))
            self.thing = nn.Linear(3, 3)
            self.rms = nn.RMSNorm(3)

    model = nn.ModuleDict({"enc": nn.TransformerEncoderLayer(8, 2, 16), "m": Mystery(),
                           "wte": nn.Embedding(5, 8)})
    types = classify(model)
    assert types["enc.self_attn.in_proj_weight"] == "QKV"
    assert types["enc.self_attn.out_proj.weight"] == "VO"
    assert types["enc.norm1.weight"] == "Norm"
    assert types["m.rms.weight"] == "Norm"
    assert types["wte.weight"] == "Emb"
    # Names that say nothing about the role stay Other rather than being guessed.
    assert types["enc.linear1.weight"] == "Other"
    assert types["m.scale"] == "Other"
    assert types["m.thing.weight"] == "Other"


def test_names_second_for_unknown_module_types():
    class RawLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(4, 4))

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.c_proj = RawLinear(), RawLinear()
            self.wk = nn.Parameter(torch.zeros(4, 4))

    model = nn.ModuleDict({"attn": Attn(), "mlp": nn.ModuleDict({"c_fc": RawLinear()})})
    types = classify(model)
    assert types["attn.q_proj.weight"] == "QK"
    assert types["attn.c_proj.weight"] == "VO"
    assert types["attn.wk"] == "QK"
    assert types["mlp.c_fc.weight"] == "FFN"


def test_param_groups_contents_llama():
    model = llama()
    lr, wd = 2e-3, 0.1
    groups = param_groups(model, lr, wd, blockwise_lr="sharpness")
    seen = [n for g in groups for n, _ in g["params"]]
    assert sorted(seen) == sorted(n for n, _ in model.named_parameters())
    types = classify(model)
    for g in groups:
        assert {types[n] for n, _ in g["params"]} == {g["block"]}
        assert g["lr"] == pytest.approx(lr * SHARPNESS_LR_MULTIPLIERS[g["block"]])
        assert g["max_lr"] == g["lr"]
        if g["block"] == "Norm":
            assert g["weight_decay"] == 0.0 and not g["corrected"]
        elif g["block"] in ("QK", "VO", "FFN"):
            assert g["weight_decay"] == wd and g["corrected"]
        else:  # Emb, Head: decayed, never corrected
            assert g["weight_decay"] == wd and not g["corrected"]
    assert {g["block"]: g["lr"] / lr for g in groups} == pytest.approx(
        {"Emb": 10.0, "QK": 8.0, "VO": 4.0, "FFN": 6.0, "Norm": 1.0, "Head": 1.0})


def test_param_groups_options():
    model = gpt2(n_layer=1)
    groups = param_groups(model, 1e-3, 0.1, corrected=False, no_decay=("bias", "Norm", "Emb"),
                          blockwise_lr={"FFN": 2.0}, max_lr=4e-3)
    for g in groups:
        assert not g["corrected"]
        names = [n for n, _ in g["params"]]
        if g["block"] in ("Emb", "Norm") or any(n.endswith("bias") for n in names):
            assert g["weight_decay"] == 0.0
        mult = 2.0 if g["block"] == "FFN" else 1.0
        assert g["lr"] == pytest.approx(1e-3 * mult) and g["max_lr"] == pytest.approx(4e-3 * mult)
    with pytest.raises(ValueError, match="blockwise_lr"):
        param_groups(model, 1e-3, 0.1, blockwise_lr={"Attn": 2.0})
    with pytest.raises(ValueError, match="blockwise_lr"):
        param_groups(model, 1e-3, 0.1, blockwise_lr="fast")
    # weight_decay=0 decays nothing, so nothing is corrected either.
    assert all(not g["corrected"] and g["weight_decay"] == 0 for g in param_groups(model, 1e-3, 0.0))


def test_param_groups_skip_frozen_and_drive_torch_optim():
    model = llama()
    model.model.embed_tokens.weight.requires_grad_(False)
    groups = param_groups(model, 1e-3, 0.1, blockwise_lr="sharpness")
    assert all(n != "model.embed_tokens.weight" for g in groups for n, _ in g["params"])
    opt = torch.optim.AdamW(groups)
    x = torch.randint(0, 64, (2, 8))
    model(x, labels=x).loss.backward()
    opt.step()
    assert [g["block"] for g in opt.param_groups] == [g["block"] for g in groups]


def test_block_types_cover_multipliers():
    assert set(SHARPNESS_LR_MULTIPLIERS) == set(BLOCK_TYPES)
