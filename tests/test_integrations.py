"""fusedopt optimizers in Lightning and the Hugging Face Trainer (CPU, tiny models).

The tests run the examples' own functions (examples/lightning_fusedopt.py,
examples/hf_trainer_fusedopt.py), so the examples and the claims of docs/integrations.md are
what is checked: exact checkpoint resume, clipping through max_grad_norm, and what each
framework's own clipping path does with a fusedopt optimizer.
"""
import importlib.util
import math
from pathlib import Path

import pytest
import torch

import fusedopt

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_same_params(a, b):
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), f"{name} differs by {(pa - pb).abs().max().item():.3e}"


def count_clip_calls(monkeypatch, with_accelerate=False):
    """Record every torch.nn.utils.clip_grad_norm_ call (and accelerate's
    Accelerator.clip_grad_norm_, which calls it) as (whose, max_norm)."""
    calls = []
    torch_clip = torch.nn.utils.clip_grad_norm_

    def counting_torch_clip(parameters, max_norm, *args, **kwargs):
        calls.append(("torch", float(max_norm)))
        return torch_clip(parameters, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", counting_torch_clip)
    if with_accelerate:
        import accelerate

        accelerate_clip = accelerate.Accelerator.clip_grad_norm_

        def counting_accelerate_clip(self, parameters, max_norm, *args, **kwargs):
            calls.append(("accelerate", float(max_norm)))
            return accelerate_clip(self, parameters, max_norm, *args, **kwargs)

        monkeypatch.setattr(accelerate.Accelerator, "clip_grad_norm_", counting_accelerate_clip)
    return calls


# ----------------------------------------------------------------------------- Lightning
@pytest.fixture(scope="module")
def lit():
    pytest.importorskip("lightning", reason="lightning is not installed (pip install -e '.[test]')")
    return load_example("lightning_fusedopt")


@pytest.mark.parametrize("precision, scaler", [("bf16-mixed", None), ("16-mixed", "fusedopt"),
                                               ("16-mixed", "torch"), ("32-true", None)])
def test_lightning_resume_is_exact(lit, precision, scaler, tmp_path):
    full = lit.train(precision, checkpoint_dir=tmp_path / "full", scaler=scaler)
    checkpoint = tmp_path / "full" / f"epoch=0-step={lit.BATCHES_PER_EPOCH}.ckpt"
    resumed = lit.train(precision, checkpoint_dir=tmp_path / "resumed", resume_from=checkpoint,
                        scaler=scaler)
    assert resumed.trainer.precision == precision
    assert isinstance(resumed.trainer.optimizers[0], fusedopt.AdamC)
    assert resumed.trainer.global_step == full.trainer.global_step == lit.BATCHES_PER_EPOCH * lit.EPOCHS
    # The steps after the checkpoint saw the same gradients, and ended on the same weights.
    assert resumed.step_stats == full.step_stats[lit.BATCHES_PER_EPOCH:]
    assert_same_params(full, resumed)
    if precision == "16-mixed":
        # The loss scale reached the fused step (fusedopt's handshake or torch's grad_scale).
        assert {s["loss_scale"] for s in full.step_stats} == {2.0 ** 16}


def test_lightning_16_mixed_loss_scalers(lit, monkeypatch):
    # torch.amp.GradScaler.step checks the gradients for inf/NaN in a pass of its own
    # (torch._amp_foreach_non_finite_check_and_unscale_) before it calls a fused step;
    # fusedopt.GradScaler leaves that to the step. Same result, bit for bit.
    checks = []
    check = torch._amp_foreach_non_finite_check_and_unscale_

    def counting_check(*args, **kwargs):
        checks.append(1)
        return check(*args, **kwargs)

    monkeypatch.setattr(torch, "_amp_foreach_non_finite_check_and_unscale_", counting_check)
    with_torch = lit.train("16-mixed", scaler="torch")
    assert len(checks) == lit.BATCHES_PER_EPOCH * lit.EPOCHS
    checks.clear()
    with_fusedopt = lit.train("16-mixed", scaler="fusedopt")
    assert checks == []
    assert isinstance(with_fusedopt.trainer.precision_plugin.scaler, fusedopt.GradScaler)
    assert_same_params(with_torch, with_fusedopt)


def test_lightning_16_mixed_flag_on_cpu_means_bf16(lit):
    # Why the tests pass fp16 on CPU as an explicit MixedPrecision plugin.
    with pytest.warns(UserWarning, match="Using `precision='bf16-mixed'` instead"):
        trainer = lit.L.Trainer(accelerator="cpu", precision="16-mixed", logger=False)
    assert trainer.precision == "bf16-mixed"


def test_lightning_clips_through_max_grad_norm(lit):
    model = lit.train("bf16-mixed", model=lit.TinyRegressor(max_grad_norm=0.05))
    assert model.trainer.gradient_clip_val is None
    for s in model.step_stats:
        assert s["clip_coef"] < 1
        assert s["clip_coef"] == pytest.approx(0.05 / (s["grad_norm"] + 1e-6), rel=1e-6)


@pytest.mark.parametrize("algorithm", ["norm", "value"])
@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_lightning_gradient_clip_val_refused_under_mixed_precision(lit, precision, algorithm):
    # MixedPrecision.clip_gradients refuses any optimizer with _step_supports_amp_scaling,
    # with or without a loss scaler, whatever the algorithm.
    with pytest.raises(RuntimeError, match="does not allow for gradient clipping"):
        lit.train(precision, gradient_clip_val=1.0, gradient_clip_algorithm=algorithm)


def test_lightning_gradient_clip_val_under_32_true_clips_before_the_step(lit, monkeypatch):
    calls = count_clip_calls(monkeypatch)
    unclipped = lit.train("32-true", model=lit.TinyRegressor(max_grad_norm=None))
    clipped = lit.train("32-true", model=lit.TinyRegressor(max_grad_norm=None), gradient_clip_val=1.0)
    steps = lit.BATCHES_PER_EPOCH * lit.EPOCHS
    assert calls == [("torch", 1.0)] * steps
    # The first step's gradient is the same in both runs; fusedopt's step (and its statistics)
    # saw it after Lightning's clip.
    assert unclipped.step_stats[0]["grad_norm"] > 1
    assert clipped.step_stats[0]["grad_norm"] == pytest.approx(1.0, rel=1e-5)
    assert all(s["grad_norm"] <= 1 + 1e-5 for s in clipped.step_stats)


# ----------------------------------------------------------------------------- Hugging Face
@pytest.fixture(scope="module")
def hf():
    pytest.importorskip("transformers", reason="transformers is not installed (pip install -e '.[test]')")
    pytest.importorskip("accelerate", reason="the Trainer needs accelerate (pip install -e '.[test]')")
    return load_example("hf_trainer_fusedopt")


def logged(trainer, key):
    return [entry[key] for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.parametrize("how", ["optimizers", "optimizer_cls_and_kwargs"])
def test_hf_resume_is_exact(hf, how, tmp_path):
    train = {"optimizers": hf.train_with_optimizers,
             "optimizer_cls_and_kwargs": hf.train_with_optimizer_cls}[how]
    full = train(tmp_path / "full", max_steps=8, save_steps=4)
    resumed = train(tmp_path / "resumed", max_steps=8, save_steps=4,
                    resume_from=str(tmp_path / "full" / "checkpoint-4"))
    assert resumed.state.global_step == 8
    # The resumed log starts with the checkpoint's 4 entries; the 4 after them are new.
    for key in ("loss", "grad_norm", "learning_rate"):
        assert logged(resumed, key) == logged(full, key), key
    assert_same_params(full.model, resumed.model)


def test_hf_optimizer_cls_and_kwargs_builds_the_groups(hf, tmp_path):
    trainer = hf.train_with_optimizer_cls(tmp_path, max_steps=1, learning_rate=5.0)
    opt = hf.unwrap(trainer.optimizer)
    assert type(opt) is fusedopt.AdamW and opt.max_grad_norm == 0.5
    # weight_decay comes from TrainingArguments (none on biases and LayerNorm weights); lr comes
    # from the kwargs, not from TrainingArguments.learning_rate.
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert [g["initial_lr"] for g in opt.param_groups] == [1e-3, 1e-3]
    # The optimizer is built before the Trainer's warmup scheduler sets lr to 0, so max_lr (the
    # corrected decay's lr_max) is the kwargs' lr.
    assert [g["max_lr"] for g in opt.param_groups] == [1e-3, 1e-3]


def test_hf_recipe_leaves_clipping_to_fusedopt(hf, tmp_path, monkeypatch):
    calls = count_clip_calls(monkeypatch, with_accelerate=True)
    trainer = hf.train_with_optimizers(tmp_path, max_steps=4, fusedopt_max_grad_norm=0.05)
    assert trainer.args.max_grad_norm == 0 and isinstance(trainer, hf.FusedoptTrainer)
    assert calls == []
    stats = hf.unwrap(trainer.optimizer).stats().to_dict()["global"]
    assert stats["clip_coef"] < 1
    # The logged norm is fusedopt's, measured before its clip.
    assert logged(trainer, "grad_norm")[-1] == stats["grad_norm"]
    assert stats["clip_coef"] == pytest.approx(0.05 / (stats["grad_norm"] + 1e-6), rel=1e-6)


def test_hf_plain_trainer_max_grad_norm_0_still_measures_the_norm(hf, tmp_path, monkeypatch):
    calls = count_clip_calls(monkeypatch, with_accelerate=True)
    plain = hf.train_with_optimizers(tmp_path / "plain", max_steps=4, trainer_cls=hf.Trainer)
    # transformers 5.x: clip_grad_norm_(params, inf) per step for the logged norm (a norm pass
    # and a multiply-by-1 pass over the gradients).
    assert calls == [("accelerate", math.inf), ("torch", math.inf)] * 4
    recipe = hf.train_with_optimizers(tmp_path / "recipe", max_steps=4)
    # Multiplying by 1 changes nothing: the recipe only saves the passes, and logs the same
    # norm (fusedopt's, reduced in another order).
    assert_same_params(plain.model, recipe.model)
    assert logged(recipe, "grad_norm") == pytest.approx(logged(plain, "grad_norm"), rel=1e-5)


def test_hf_default_max_grad_norm_clips_before_fusedopt(hf, tmp_path, monkeypatch):
    calls = count_clip_calls(monkeypatch, with_accelerate=True)
    trainer = hf.train_with_optimizers(tmp_path, max_steps=4, fusedopt_max_grad_norm=0.05,
                                       trainer_cls=hf.Trainer, max_grad_norm=1.0)
    assert calls == [("accelerate", 1.0), ("torch", 1.0)] * 4
    # fusedopt clipped gradients the Trainer had already clipped to norm 1.
    stats = hf.unwrap(trainer.optimizer).stats().to_dict()["global"]
    assert stats["grad_norm"] == pytest.approx(1.0, rel=1e-5)
    assert stats["clip_coef"] == pytest.approx(0.05, rel=1e-5)
