"""Provoke Adam loss spikes on a small network and check SpikeMonitor and the exact check.

Bai et al. 2025 (arXiv 2506.04805): once the loss is low, g^2 << v on most coordinates, v decays
as beta2^k, the preconditioned step grows and the loss spikes when the curvature along the
preconditioned gradient passes 2/lr. Their minimal setting is a small fully connected network
trained full-batch with Adam; this script uses one (1-64-64-1 tanh MLP fitting
sin(2x) + 0.3 cos(5x) on 256 points), trained with fusedopt.AdamW (statistics on) three ways:
    spiky      beta2 = 0.999, eps = 1e-8, lr = 3e-3
    beta2=0.95 the same with beta2 = 0.95 (v tracks g^2 within ~20 steps)
    eps=1e-2   the same with eps = 1e-2 (caps the per-coordinate step at lr/eps)
Every step feeds opt.stats() to a SpikeMonitor; every --sharp-every steps it runs the exact
preconditioned_sharpness. A spike is a step whose loss exceeds 10x the minimum of the previous
50 steps; its onset is the first such step after 50 spike-free steps.
Writes docs/diagnostics/spikes.png and spikes.json.

    python examples/diagnostics_spikes.py            # about 2-4 minutes on 2 CPU cores
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

from fusedopt import AdamW
from fusedopt.diagnostics import SpikeMonitor, preconditioned_sharpness

RUNS = {"spiky": dict(betas=(0.9, 0.999), eps=1e-8), "beta2=0.95": dict(betas=(0.9, 0.95), eps=1e-8),
        "eps=1e-2": dict(betas=(0.9, 0.999), eps=1e-2)}


def data():
    x = torch.linspace(-3, 3, 256)[:, None]
    return x, torch.sin(2 * x) + 0.3 * torch.cos(5 * x)


def mse(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def spike_onsets(losses, factor=10.0, window=50):
    onsets, last = [], -10 * window
    for i in range(window, len(losses)):
        if losses[i] > factor * min(losses[i - window:i]):
            if i - last > window:
                onsets.append(i)
            last = i
    return onsets


def train(name, args):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
    opt = AdamW(list(model.named_parameters()), lr=args.lr, weight_decay=0.0, stats=True, **RUNS[name])
    monitor = SpikeMonitor(opt, decay_frac=args.decay_frac, patience=args.patience)
    batch = data()
    log = {"loss": [], "flagged": [], "max_frac": [], "max_step": [], "sharp_step": [],
           "lambda_max": [], "grad_curvature": []}
    for step in range(args.steps):
        opt.zero_grad()
        loss = mse(model, batch)
        loss.backward()
        opt.step()
        flagged = monitor.update(opt.stats())
        log["loss"].append(loss.item())
        log["flagged"].append(int(flagged.sum()))
        log["max_frac"].append(monitor.frac.max().item())
        log["max_step"].append(monitor.max_step.max().item())
        if step % args.sharp_every == 0 and step > 0:
            ps = preconditioned_sharpness(model, mse, batch, opt, iters=args.iters)
            log["sharp_step"].append(step)
            log["lambda_max"].append(ps.lambda_max)
            log["grad_curvature"].append(ps.grad_curvature)
    return log


def summarize(log, args, gap=50, settle=300):
    """Per spike: was a tensor flagged in the `gap` steps before the onset (the flag drops a few
    steps before the 10x onset, when growing gradients make v track g^2 again), and since when
    (lead = onset - first step of that flagged run). Per run: the share of steps after `settle`
    that are flagged, and the exact check's peaks x lr."""
    onsets = spike_onsets(log["loss"])
    flags = [f > 0 for f in log["flagged"]]
    per_spike = []
    for s in onsets:
        recent = [i for i in range(max(0, s - gap), s) if flags[i]]
        start = None
        if recent:
            start = recent[-1]
            while start > 0 and flags[start - 1]:
                start -= 1
        near = [(lam, cur) for k, lam, cur in zip(log["sharp_step"], log["lambda_max"], log["grad_curvature"])
                if s - 3 * args.sharp_every <= k <= s + args.sharp_every]
        per_spike.append({"onset": s, "flagged_before": bool(recent), "flag_run_start": start,
                          "lead_steps": None if start is None else s - start,
                          "lr_x_lambda_max_peak": args.lr * max(l for l, _ in near) if near else None,
                          "lr_x_grad_curvature_peak": args.lr * max(c for _, c in near) if near else None})
    lam_lr = [args.lr * v for v in log["lambda_max"]]
    cur_lr = [args.lr * v for v in log["grad_curvature"]]
    late = [k for k, step in enumerate(log["sharp_step"]) if step >= settle]
    return {"spikes": len(onsets), "per_spike": per_spike,
            "flagged_share_after_settle": sum(flags[settle:]) / max(1, len(flags[settle:])),
            "final_loss": log["loss"][-1], "min_loss": min(log["loss"]),
            "median_lr_x_lambda_max_after_settle": sorted(lam_lr[k] for k in late)[len(late) // 2],
            "max_lr_x_lambda_max": max(lam_lr), "max_lr_x_grad_curvature": max(cur_lr),
            "threshold_x_lr": 2.0, "momentum_threshold_x_lr": (2 + 2 * 0.9) / (1 - 0.9)}


def plot(logs, path, args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(10, 10), sharex=True)
    for name, log in logs.items():
        axes[0].semilogy(log["loss"], label=name, lw=0.8)
    spiky = logs["spiky"]
    for s in spike_onsets(spiky["loss"]):
        for ax in axes:
            ax.axvline(s, color="red", alpha=0.25, lw=0.8)
    axes[0].set_ylabel("loss (full batch)")
    axes[0].legend()
    axes[0].set_title("Adam loss spikes (red lines: spike onsets of the spiky run)")
    flag = [1 if f else float("nan") for f in spiky["flagged"]]
    axes[1].plot(spiky["max_frac"], lw=0.6, label="max over tensors of v_decrease_frac")
    axes[1].plot([1.02 * f for f in flag], "k|", ms=4, label="SpikeMonitor flag (any tensor)")
    axes[1].axhline(args.decay_frac, color="gray", ls=":")
    axes[1].set_ylabel("spiky run")
    axes[1].legend(loc="lower left")
    for name, log in logs.items():
        axes[2].semilogy(log["sharp_step"], [args.lr * v for v in log["lambda_max"]], lw=0.8,
                         label=f"{name}: lr * lambda_max(P H)")
    axes[2].semilogy(spiky["sharp_step"], [max(args.lr * v, 1e-3) for v in spiky["grad_curvature"]], "k.",
                     ms=2, label="spiky: lr * grad-direction curvature")
    axes[2].axhline(2, color="red", ls="--", label="2 (lr * 2/lr)")
    axes[2].axhline(38, color="purple", ls="--", label="38 (lr * (2+2 beta1)/((1-beta1) lr))")
    axes[2].set_ylabel("exact check x lr")
    axes[2].set_xlabel("step")
    axes[2].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1600)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--decay-frac", type=float, default=0.9)
    ap.add_argument("--patience", type=int, default=10)
    ap.add_argument("--sharp-every", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "diagnostics"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logs, summary = {}, {"args": vars(args), "torch": torch.__version__}
    for name in RUNS:
        t0 = time.time()
        logs[name] = train(name, args)
        summary[name] = summarize(logs[name], args)
        summary[name]["seconds"] = round(time.time() - t0, 1)
        s = summary[name]
        print(f"{name:11s} spikes {s['spikes']:2d}  flagged share of steps >= 300: "
              f"{s['flagged_share_after_settle']:.2f}  median lr*lambda_max {s['median_lr_x_lambda_max_after_settle']:.1f}"
              f"  max lr*grad-curvature {s['max_lr_x_grad_curvature']:.1f}  min loss {s['min_loss']:.2e}  "
              f"final loss {s['final_loss']:.2e}  ({s['seconds']} s)")
        for p in s["per_spike"]:
            print(f"    spike at {p['onset']}: flagged before {p['flagged_before']} (lead {p['lead_steps']} steps), "
                  f"lr*lambda_max peak {p['lr_x_lambda_max_peak']:.1f}, lr*grad-curvature peak "
                  f"{p['lr_x_grad_curvature_peak']:.1f}")
    plot(logs, out / "spikes.png", args)
    (out / "spikes.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
