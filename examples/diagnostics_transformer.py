"""Per-block sharpness, base vs blockwise LR, and gradient heterogeneity AdamW vs SGD on the
demo transformer (fusedopt.demo_model.GPT on the demo's generated corpus).

Three runs from the same seed, on the same batches, with the same warmup + cosine schedule shape
(LambdaLR scales every group's lr by the same factor), statistics on:
    AdamW        fusedopt.AdamW, param_groups(blockwise_lr=None), lr --lr
    AdamW-block  the same with blockwise_lr="sharpness" (Wang et al. 2025: Norm 1x, VO 4x,
                 FFN 6x, QK 8x, Emb 10x; the demo's fused qkv is QKV at 4x, the head 1x)
    SGD          fusedopt.SGD, momentum 0.9, lr --sgd-lr, same groups as AdamW
Every step: block_sharpness (batch size B) and grad_heterogeneity from opt.stats(), on the device.
The demo model fuses q, k, v in one Linear, so its QK and VO(v) parts are one tensor ("QKV");
VO here is the attention output projection alone.
Writes docs/diagnostics/transformer.png and transformer.json.

    python examples/diagnostics_transformer.py      # about 3-5 minutes on 2 CPU cores
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from fusedopt import AdamW
from fusedopt.blocks import classify, param_groups
from fusedopt.demo_data import Batches, generate_corpus
from fusedopt.demo_model import GPT, GPTConfig
from fusedopt.diagnostics import block_sharpness, grad_heterogeneity
from fusedopt import SGD

RUNS = ("AdamW", "AdamW-block", "SGD")


def schedule(warmup, total, floor=0.1):
    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def train(name, args, corpus):
    torch.manual_seed(args.seed)
    model = GPT(GPTConfig(vocab_size=corpus.vocab_size, context=args.context, n_layer=args.layers,
                          n_head=4, d_model=args.d_model))
    types = classify(model)
    if name == "SGD":
        groups = param_groups(model, args.sgd_lr, 0.0, corrected=False)
        opt = SGD(groups, lr=args.sgd_lr, momentum=0.9, stats=True, max_grad_norm=1.0)
    else:
        groups = param_groups(model, args.lr, 0.1, corrected=False,
                              blockwise_lr="sharpness" if name == "AdamW-block" else None)
        opt = AdamW(groups, lr=args.lr, betas=(0.9, 0.95), stats=True, max_grad_norm=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule(args.warmup, args.steps))
    batches = Batches(corpus.train, args.batch_size, args.context, seed=args.seed)
    log = {"loss": [], "sharpness": [], "heterogeneity": [], "types": None}
    for _ in range(args.steps):
        x, y = batches.next()
        opt.zero_grad()
        loss = model(x, y)
        loss.backward()
        opt.step()
        sched.step()
        stats = opt.stats()
        figures = block_sharpness(stats, types, batch_size=args.batch_size)
        het = grad_heterogeneity(stats, types)
        log["types"] = figures.types
        log["loss"].append(loss.item())
        log["sharpness"].append(figures.sharpness.tolist())
        log["heterogeneity"].append({k: v.item() for k, v in het.items()})
    model.eval()
    val = Batches(corpus.val, args.batch_size, args.context, seed=args.seed + 1)
    with torch.no_grad():
        log["val_loss"] = sum(model(*val.next()).item() for _ in range(args.val_batches)) / args.val_batches
    return log


def window_mean(rows, end, width):
    chunk = rows[max(0, end - width):end]
    return [sum(c) / len(chunk) for c in zip(*chunk)]


def summarize(logs, args):
    out = {}
    for name, log in logs.items():
        het = log["heterogeneity"]
        checkpoints = {}
        for end in (args.steps // 10, args.steps // 4, args.steps // 2, args.steps):
            mean = window_mean(log["sharpness"], end, args.window)
            checkpoints[end] = {"ordering": [t for _, t in sorted(zip(mean, log["types"]))],
                                "sharpness": dict(zip(log["types"], mean))}
        late = het[args.steps // 2:]
        out[name] = {
            "final_train_loss_mean_last_window": sum(log["loss"][-args.window:]) / args.window,
            "val_loss": log["val_loss"],
            "sharpness_checkpoints": checkpoints,
            "heterogeneity_second_half_mean": {k: sum(h[k] for h in late) / len(late) for k in late[0]},
        }
    return out


def plot(logs, path, args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def smooth(v, w=args.window):
        return [sum(v[max(0, i - w + 1):i + 1]) / len(v[max(0, i - w + 1):i + 1]) for i in range(len(v))]

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    for name, log in logs.items():
        axes[0, 0].plot(smooth(log["loss"]), label=f"{name} (val {log['val_loss']:.3f})")
    axes[0, 0].set_title(f"train loss ({args.window}-step mean)")
    axes[0, 0].set_xlabel("step")
    axes[0, 0].legend()
    for panel, name in ((axes[0, 1], "AdamW"), (axes[1, 0], "AdamW-block")):
        log = logs[name]
        for j, t in enumerate(log["types"]):
            panel.semilogy(smooth([row[j] for row in log["sharpness"]]), label=t)
        panel.set_title(f"{name}: sharpness proxy B*||g_b||^2/numel_b per block type")
        panel.set_xlabel("step")
        panel.legend(fontsize=8)
    for name, style in (("AdamW", "-"), ("SGD", "--")):
        het = logs[name]["heterogeneity"]
        for key, color in (("rms_ratio", "C0"), ("block_rms_ratio", "C1"), ("norm_ratio", "C2")):
            axes[1, 1].semilogy(smooth([h[key] for h in het]), style, color=color, label=f"{name} {key}")
    axes[1, 1].set_title("gradient heterogeneity (max/min ratios)")
    axes[1, 1].set_xlabel("step")
    axes[1, 1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--warmup", type=int, default=60)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--sgd-lr", type=float, default=0.1)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--window", type=int, default=20)
    ap.add_argument("--val-batches", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "diagnostics"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = generate_corpus()
    logs, seconds = {}, {}
    for name in RUNS:
        t0 = time.time()
        logs[name] = train(name, args, corpus)
        seconds[name] = round(time.time() - t0, 1)
    summary = summarize(logs, args)
    for name, s in summary.items():
        print(f"{name:12s} train loss (last {args.window}) {s['final_train_loss_mean_last_window']:.4f}  "
              f"val {s['val_loss']:.4f}  ({seconds[name]} s)")
        for end, c in s["sharpness_checkpoints"].items():
            values = "  ".join(f"{t} {v:.3g}" for t, v in sorted(c["sharpness"].items(), key=lambda kv: kv[1]))
            print(f"    sharpness @ {end:4d}: {values}")
        print("    heterogeneity (2nd half mean): " +
              "  ".join(f"{k} {v:.3g}" for k, v in s["heterogeneity_second_half_mean"].items()))
    plot(logs, out / "transformer.png", args)
    (out / "transformer.json").write_text(json.dumps(
        {"args": vars(args), "torch": torch.__version__, "seconds": seconds, "runs": summary}, indent=1))


if __name__ == "__main__":
    main()
