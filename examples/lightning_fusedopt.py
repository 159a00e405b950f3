"""A fusedopt optimizer in Lightning: tiny regression model, CPU, bf16-mixed.

configure_optimizers returns a fusedopt.AdamC with max_grad_norm and a per-step cosine
schedule. Clipping is the optimizer's (max_grad_norm), not Lightning's gradient_clip_val:
Lightning's mixed-precision plugin (bf16-mixed and 16-mixed) refuses gradient_clip_val for any
optimizer that unscales inside its step, and under 32-true gradient_clip_val runs
clip_grad_norm_ before the step (two more passes over the gradients). See docs/integrations.md.

The script trains 3 epochs of 4 steps with a checkpoint at every epoch end, resumes from the
first one in a fresh Trainer, and checks that the resumed run ends on the same parameters bit
for bit.

    python examples/lightning_fusedopt.py                      # a few seconds on 2 CPU cores
    python examples/lightning_fusedopt.py --precision 16-mixed  # fp16 autocast, fusedopt.GradScaler
    python examples/lightning_fusedopt.py --precision 16-mixed --scaler torch
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fusedopt

BATCHES_PER_EPOCH = 4
EPOCHS = 3


class TinyRegressor(L.LightningModule):
    """An 8-32-1 MLP; the same weights for the same seed, no dropout (no RNG in training)."""

    def __init__(self, lr=1e-2, max_grad_norm=0.05, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 1))
        self.lr = lr
        self.max_grad_norm = max_grad_norm
        self.step_stats = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        # Under autocast the output is bf16/fp16; the loss is taken in fp32.
        return nn.functional.mse_loss(self.net(x).float(), y)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        # One sync per step: fine for a 12-step example, not for a real run (read every N steps).
        self.step_stats.append(self.optimizers().optimizer.stats().to_dict()["global"])

    def configure_optimizers(self):
        opt = fusedopt.AdamC(self.parameters(), lr=self.lr, max_grad_norm=self.max_grad_norm,
                             stats=True)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=BATCHES_PER_EPOCH * EPOCHS)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def data():
    """A fixed dataset in a fixed order: Lightning saves no sampler state, so exact resume
    needs an order that does not depend on RNG state (shuffle=False here)."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(8 * BATCHES_PER_EPOCH, 8, generator=generator)
    y = torch.randn(8 * BATCHES_PER_EPOCH, 1, generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False)


def make_trainer(precision="bf16-mixed", checkpoint_dir=None, scaler="fusedopt", **overrides):
    """A CPU Trainer.

    "16-mixed" comes as an explicit plugin: on CPU, Trainer(precision="16-mixed") would switch
    to bf16-mixed (with a warning). The plugin's loss scaler is fusedopt.GradScaler by default:
    the fused step then unscales, checks for inf/NaN and updates the scale. scaler="torch" gives
    Lightning's own torch.amp.GradScaler (what precision="16-mixed" builds on a GPU), which
    hands its scale to the fused step too but checks the gradients for inf/NaN in a pass of its
    own first.
    """
    kwargs = dict(accelerator="cpu", devices=1, max_epochs=EPOCHS, logger=False,
                  enable_progress_bar=False, enable_model_summary=False)
    if precision == "16-mixed":
        loss_scaler = fusedopt.GradScaler() if scaler == "fusedopt" else None
        kwargs["plugins"] = [MixedPrecision("16-mixed", "cpu", scaler=loss_scaler)]
    else:
        kwargs["precision"] = precision
    if checkpoint_dir is None:
        kwargs["enable_checkpointing"] = False
    else:
        # Epoch-end checkpoints: a mid-epoch one restarts a plain DataLoader at its first batch
        # on resume (Lightning warns), so the resumed run would see other batches.
        kwargs["callbacks"] = [ModelCheckpoint(dirpath=checkpoint_dir, filename="{epoch}-{step}",
                                               every_n_epochs=1, save_top_k=-1)]
    kwargs.update(overrides)
    return L.Trainer(**kwargs)


def train(precision="bf16-mixed", checkpoint_dir=None, resume_from=None, model=None,
          scaler="fusedopt", **overrides):
    """Fit `model` (a fresh TinyRegressor by default); with resume_from, Lightning restores the
    weights, the optimizer and scheduler states, the loss scaler (16-mixed) and the loop
    counters from that checkpoint."""
    model = TinyRegressor() if model is None else model
    trainer = make_trainer(precision, checkpoint_dir, scaler, **overrides)
    trainer.fit(model, data(), ckpt_path=resume_from)
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--precision", default="bf16-mixed",
                        choices=["bf16-mixed", "16-mixed", "32-true"])
    parser.add_argument("--scaler", default="fusedopt", choices=["fusedopt", "torch"],
                        help="the loss scaler under 16-mixed")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        full = train(args.precision, checkpoint_dir=Path(tmp) / "full", scaler=args.scaler)
        for i, s in enumerate(full.step_stats, 1):
            print(f"step {i:2d}: grad_norm {s['grad_norm']:.3f}  clip_coef {s['clip_coef']:.3f}  "
                  f"loss_scale {s['loss_scale']:g}")
        checkpoint = Path(tmp) / "full" / f"epoch=0-step={BATCHES_PER_EPOCH}.ckpt"
        resumed = train(args.precision, checkpoint_dir=Path(tmp) / "resumed",
                        resume_from=checkpoint, scaler=args.scaler)
        same = all(torch.equal(a, b) for a, b in zip(full.parameters(), resumed.parameters()))
        print(f"resumed from step {BATCHES_PER_EPOCH}: parameters equal the uninterrupted run: {same}")


if __name__ == "__main__":
    main()
