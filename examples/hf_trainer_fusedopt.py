"""A fusedopt optimizer in the Hugging Face Trainer: tiny GPT-2, CPU, no downloads.

Two ways to hand the Trainer a fusedopt optimizer:
    optimizers=(opt, scheduler)                      you build both
    optimizer_cls_and_kwargs=(fusedopt.AdamW, {...})  the Trainer builds the param groups
                                                     (weight decay / no decay) and its scheduler
fusedopt clips in its step (max_grad_norm on the optimizer), so the Trainer's own clipping is
turned off with TrainingArguments(max_grad_norm=0). In transformers 5.x the Trainer then still
calls accelerator.clip_grad_norm_(params, inf) every step to log the gradient norm (a norm pass
and a multiply-by-1 pass over every gradient); FusedoptTrainer below skips that and logs the norm
fusedopt measured in its step instead. See docs/integrations.md.

The script trains 12 steps, then again with a checkpoint at step 6 and a resume from it in a
fresh Trainer, and checks that the resumed run ends on the same parameters bit for bit.

    python examples/hf_trainer_fusedopt.py           # about 8 s on 2 idle CPU cores
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

import fusedopt

VOCAB = 64
SEQ_LEN = 16


def tiny_gpt2(seed=0):
    """A 2-layer GPT-2 with random init (same weights for the same seed)."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_positions=SEQ_LEN, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


class RandomTokens(torch.utils.data.Dataset):
    """Fixed random token sequences; labels are the inputs (the model shifts them)."""

    def __init__(self, n=32, seed=0):
        generator = torch.Generator().manual_seed(seed)
        self.tokens = torch.randint(0, VOCAB, (n, SEQ_LEN), generator=generator)

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, i):
        return {"input_ids": self.tokens[i], "labels": self.tokens[i]}


def unwrap(optimizer):
    """The fusedopt optimizer inside the Trainer's accelerate wrapper (AcceleratedOptimizer)."""
    while not isinstance(optimizer, fusedopt.optimizer.FusedOptimizer):
        optimizer = optimizer.optimizer
    return optimizer


class FusedoptTrainer(Trainer):
    """A Trainer for an optimizer that clips in its step: run with max_grad_norm=0.

    transformers 5.x measures the gradient norm for its log with
    accelerator.clip_grad_norm_(params, inf) whenever it does not clip, two extra passes over the
    gradients per step. fusedopt measures the same norm (before clipping) inside its step, so
    the Trainer's pass is skipped and the log reads the optimizer's figure. `_get_grad_norm` is
    a private Trainer method (transformers 5.x); tests/test_integrations.py checks that no
    clip_grad_norm_ call is left.
    """

    def _get_grad_norm(self, model, grad_norm=None):
        return grad_norm

    def log(self, logs, start_time=None):
        if "loss" in logs and "grad_norm" not in logs:
            # One sync per logged step, where the Trainer's own figure also syncs.
            logs["grad_norm"] = unwrap(self.optimizer).stats().globals["grad_norm"].item()
        super().log(logs, start_time)


def training_args(output_dir, max_steps=12, save_steps=None, **overrides):
    """CPU, no reporting; max_grad_norm=0: the Trainer does not clip, fusedopt does.

    learning_rate is not set: neither way of passing a fusedopt optimizer uses it. The
    scheduler and weight-decay arguments apply to optimizer_cls_and_kwargs only."""
    kwargs = dict(output_dir=str(output_dir), use_cpu=True, seed=0, max_steps=max_steps,
                  per_device_train_batch_size=4, lr_scheduler_type="cosine",
                  warmup_steps=2, weight_decay=0.1, max_grad_norm=0,
                  save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
                  logging_steps=1, report_to="none", disable_tqdm=True)
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def fusedopt_and_scheduler(model, max_steps, fusedopt_max_grad_norm):
    """fusedopt.AdamC with its own clipping, decay on the 2-D weights only, and a cosine schedule."""
    decay = [p for p in model.parameters() if p.ndim == 2]
    rest = [p for p in model.parameters() if p.ndim != 2]
    opt = fusedopt.AdamC([{"params": decay, "weight_decay": 0.1},
                          {"params": rest, "weight_decay": 0.0, "corrected": False}],
                         lr=1e-3, max_grad_norm=fusedopt_max_grad_norm, stats=True)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max_steps)
    return opt, scheduler


def train_with_optimizers(output_dir, max_steps=12, save_steps=None, resume_from=None,
                          fusedopt_max_grad_norm=0.5, trainer_cls=FusedoptTrainer, **overrides):
    """Trainer(optimizers=(opt, scheduler)); a resume loads both states from the checkpoint."""
    model = tiny_gpt2()
    opt, scheduler = fusedopt_and_scheduler(model, max_steps, fusedopt_max_grad_norm)
    trainer = trainer_cls(model=model, args=training_args(output_dir, max_steps, save_steps, **overrides),
                          train_dataset=RandomTokens(), optimizers=(opt, scheduler))
    trainer.train(resume_from_checkpoint=resume_from)
    return trainer


def train_with_optimizer_cls(output_dir, max_steps=12, save_steps=None, resume_from=None,
                             fusedopt_max_grad_norm=0.5, trainer_cls=FusedoptTrainer, **overrides):
    """Trainer(optimizer_cls_and_kwargs=...): the Trainer groups the params (weight_decay from
    TrainingArguments, none on biases and LayerNorm) and builds the scheduler of
    lr_scheduler_type; the kwargs must carry lr (the Trainer passes only the groups)."""
    trainer = trainer_cls(
        model=tiny_gpt2(), args=training_args(output_dir, max_steps, save_steps, **overrides),
        train_dataset=RandomTokens(),
        optimizer_cls_and_kwargs=(fusedopt.AdamW, {"lr": 1e-3, "max_grad_norm": fusedopt_max_grad_norm,
                                                   "stats": True}))
    trainer.train(resume_from_checkpoint=resume_from)
    return trainer


def params(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    checkpoint_step = args.steps // 2
    with tempfile.TemporaryDirectory() as tmp:
        for name, train in [("optimizers=(opt, scheduler)", train_with_optimizers),
                            ("optimizer_cls_and_kwargs", train_with_optimizer_cls)]:
            run_dir = Path(tmp) / train.__name__
            # The uninterrupted run also writes the checkpoint the second Trainer resumes from.
            full = train(run_dir / "full", args.steps, save_steps=checkpoint_step)
            stats = unwrap(full.optimizer).stats().to_dict()["global"]
            losses = [round(e["loss"], 3) for e in full.state.log_history if "loss" in e]
            print(f"{name}: losses {losses}")
            print(f"  last step: grad_norm {stats['grad_norm']:.3f}, clip_coef {stats['clip_coef']:.3f}")
            resumed = train(run_dir / "resumed", args.steps, save_steps=checkpoint_step,
                            resume_from=str(run_dir / "full" / f"checkpoint-{checkpoint_step}"))
            a, b = params(full), params(resumed)
            same = all(torch.equal(a[n], b[n]) for n in a)
            print(f"  resumed from step {checkpoint_step}: parameters equal the uninterrupted run: {same}")


if __name__ == "__main__":
    main()
