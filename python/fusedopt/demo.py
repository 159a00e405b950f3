"""The end-of-training gradient-norm surge and its fix: AdamW vs AdamC on a small GPT.

Defazio 2025 (arXiv 2506.02285): for a layer whose output is normalized, weight decay drives
||g||/||w|| to a steady state, sqrt(2*wd/lr_t) for SGD. With a schedule that decays lr_t to zero,
AdamW's steady state moves up as lr_t falls (its weights shrink, their gradients grow), so the
gradient norm surges at the end of training. AdamC decays those layers by lr_t*wd*(lr_t/lr_max),
which makes the steady state independent of lr_t, and the gradient norm stays flat.

This command trains the same model twice, from the same seed, on the same batches, with the same
warmup + cosine-to-zero schedule: once with fusedopt.AdamW, once with fusedopt.AdamC, both with
clipping and statistics. It writes to --out:
    demo.png      loss, global grad norm, lr, per-layer ||g||/||w|| and ||w|| of both runs
    steps.jsonl   one JSON object per run and step: lr, loss, step time, the global statistics
                  of the fused step and the normalized layers' mean ||g||/||w|| and ||w||; the
                  per-tensor statistics on step 1, every --tensor-stats-every steps and the last
    summary.json  the settings and the printed summary table

Surge ratio (the number the summary reports; see `surge_ratio`): the mean global grad norm over
the last 10% of steps divided by the smallest mean over any window of the same length inside the
middle of training, steps [T/4, 3T/4).

    python -m fusedopt demo                 # defaults: about 4.5 minutes on a 2-core CPU
    python -m fusedopt demo --steps 600 --out /tmp/demo
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import fusedopt
from fusedopt.demo_data import Batches, Corpus, generate_corpus, load_file
from fusedopt.demo_model import GPT, GPTConfig, param_groups
from fusedopt.engine import backends
from fusedopt.tensorboard import log_stats

RUNS = ("AdamW", "AdamC")
COLORS = {"AdamW": "tab:red", "AdamC": "tab:blue"}
# Betas and the clip threshold of GPT-style pretraining recipes (nanoGPT, LLaMA).
BETAS = (0.9, 0.95)
MAX_GRAD_NORM = 1.0
VAL_BATCHES = 16
DEFAULT_OUT = "demo_out"  # .gitignore covers demo_out/ anywhere in the checkout

EPILOG = f"""\
writes to --out (default ./{DEFAULT_OUT}):
  demo.png      loss, global grad norm, lr, per-layer ||g||/||w|| and ||w|| of both runs
  steps.jsonl   one JSON object per run and step: lr, loss, step_ms, "global" (grad norm, clip
                coefficient, found_inf, loss scale, skipped steps) and "normalized" (mean
                ||g||/||w|| and combined ||w|| of the normalized layers); "tensors" (every
                per-tensor statistic) on step 1, every --tensor-stats-every steps and the last
                (4 MB at the defaults; --tensor-stats-every 1: every step, 71 MB)
  summary.json  the settings and the summary table printed at the end

time: 2 runs x 6000 steps at the defaults, about 4.5 min on a 2-core CPU (--threads 1); each
run's bar shows ms per step. A quick look: --steps 600 (about 35 s).

examples:
  python -m fusedopt demo
  python -m fusedopt demo --steps 600 --out /tmp/demo
  python -m fusedopt demo --data my_text.txt --tensorboard runs/demo
"""


@dataclass
class RunResult:
    name: str
    # The rows of steps.jsonl.
    steps: list[dict] = field(default_factory=list)
    normalized: list[str] = field(default_factory=list)
    # ||g||/||w|| of each normalized layer at every step, for the figure (the log holds their
    # mean at every step and each layer's figures only every --tensor-stats-every steps).
    layer_ratios: dict[str, list[float]] = field(default_factory=dict)
    val_loss: float = math.nan
    seconds: float = 0.0


def parse_args(argv: list[str] | None = None,
               prog: str = "python -m fusedopt demo") -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Train a small GPT twice, with fusedopt.AdamW and with fusedopt.AdamC\n"
        "(same seed, data and warmup + cosine-to-zero schedule), and show AdamW's\n"
        "end-of-training gradient-norm surge and AdamC's fix. The data is generated: no\n"
        "download.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--steps", type=int, default=6000,
                   help="optimizer steps per run (default: %(default)s)")
    p.add_argument("--warmup", type=float, default=0.05,
                   help="linear warmup, fraction of the steps (default: %(default)s)")
    # lr * wd * steps = 27 weight-decay timescales, as in real pretraining runs (docs/demo.md).
    p.add_argument("--lr", type=float, default=3e-3,
                   help="peak learning rate (default: %(default)s)")
    p.add_argument("--wd", type=float, default=1.5,
                   help="weight decay of the normalized layers (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=16,
                   help="sequences per step (default: %(default)s)")
    p.add_argument("--context", type=int, default=64,
                   help="tokens per sequence (default: %(default)s)")
    p.add_argument("--n-layer", type=int, default=2,
                   help="transformer blocks (default: %(default)s)")
    p.add_argument("--n-head", type=int, default=4, help="attention heads (default: %(default)s)")
    p.add_argument("--d-model", type=int, default=64, help="model width (default: %(default)s)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--backend", default="auto", choices=["auto", "reference", "triton", "cuda"],
                   help="fusedopt backend (default: auto: Triton, else the CUDA extension, on a "
                   "GPU; the PyTorch reference on a CPU)")
    p.add_argument("--data", default=None, metavar="PATH",
                   help="train on this file's bytes instead of the generated corpus")
    p.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                   help="output directory (default: ./%(default)s)")
    p.add_argument("--tensor-stats-every", type=int, default=500, metavar="N",
                   help="per-tensor statistics in steps.jsonl (and TensorBoard) on step 1, "
                   "every N-th step and the last step; 1: every step (default: %(default)s)")
    # One thread: the README's timing and the exact numbers (a CPU reduction's summation order
    # follows the thread count) then do not depend on the machine's core count.
    p.add_argument("--threads", type=int, default=1, metavar="N",
                   help="torch CPU threads (torch.set_num_threads); 0: torch's default, one per "
                   "core (default: %(default)s, which the README's timing used)")
    p.add_argument("--tensorboard", default=None, metavar="DIR",
                   help="also write TensorBoard scalars to DIR/<run> (needs tensorboard)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the init and the batches (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.steps < 20:
        p.error("--steps must be at least 20 (the summary needs windows of 10%% of the steps)")
    if args.tensor_stats_every < 1:
        p.error("--tensor-stats-every must be at least 1")
    if args.threads < 0:
        p.error("--threads must be 0 (torch's default) or more")
    return args


def logs_tensors(step: int, steps: int, every: int) -> bool:
    """Whether step (1-based) of `steps` carries per-tensor statistics in the log."""
    return step == 1 or step == steps or step % every == 0


def warmup_cosine(steps: int, warmup: int):
    """LambdaLR factor for scheduler step s (the lr the optimizer uses at step s+1): linear
    warmup, then cosine to exactly zero at the last step, so the tail of training sees lr -> 0."""

    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        progress = (s - warmup) / max(1, steps - 1 - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def train(name: str, args: argparse.Namespace, corpus: Corpus, device: torch.device,
          writer=None) -> RunResult:
    torch.manual_seed(args.seed)
    cfg = GPTConfig(corpus.vocab_size, args.context, args.n_layer, args.n_head, args.d_model)
    model = GPT(cfg).to(device)
    groups = param_groups(model, args.wd)
    # Read before the optimizer takes the groups over (it replaces (name, param) pairs by params).
    normalized = [n for n, _ in groups[0]["params"]]
    optimizer_cls = fusedopt.AdamC if name == "AdamC" else fusedopt.AdamW
    # AdamC corrects every group, but the correction scales the decay and only the normalized
    # group has decay: that group alone differs between the two runs (see param_groups).
    opt = optimizer_cls(groups, lr=args.lr, betas=BETAS, weight_decay=args.wd, max_lr=args.lr,
                        max_grad_norm=MAX_GRAD_NORM, backend=args.backend, stats=True)
    warmup = max(1, round(args.warmup * args.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(args.steps, warmup))
    batches = Batches(corpus.train, args.batch_size, args.context, seed=args.seed)
    result = RunResult(name, normalized=normalized)

    bar = _progress(args, name)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        t0 = time.perf_counter()
        x, y = (t.to(device, non_blocking=True) for t in batches.next())
        loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        # The one sync of the step: loss and statistics come back together.
        record = opt.stats().to_dict()
        loss_value = float(loss.detach())
        ms = 1e3 * (time.perf_counter() - t0)
        tensors = record["tensors"]
        ratios = [tensors[n]["grad_norm"] / tensors[n]["weight_norm"] for n in normalized]
        for n, ratio in zip(normalized, ratios):
            result.layer_ratios.setdefault(n, []).append(ratio)
        weight_norm = math.sqrt(sum(tensors[n]["weight_norm"] ** 2 for n in normalized))
        row = {"run": name, "step": step, "lr": float(lr), "loss": loss_value, "step_ms": ms,
               "global": record["global"],
               "normalized": {"g_over_w": sum(ratios) / len(ratios), "weight_norm": weight_norm}}
        if logs_tensors(step, args.steps, args.tensor_stats_every):
            row["tensors"] = tensors
        result.steps.append(row)
        if writer is not None:
            log_stats(writer, {"global": row["global"], "tensors": row.get("tensors", {})}, step)
            writer.add_scalar("train/loss", loss_value, step)
            writer.add_scalar("train/lr", float(lr), step)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}", gnorm=f"{record['global']['grad_norm']:.3f}",
                            ms=f"{ms:.1f}", refresh=False)
    result.seconds = time.perf_counter() - start
    if bar is not None:
        bar.close()
    result.val_loss = evaluate(model, corpus, args, device)
    return result


def _progress(args: argparse.Namespace, name: str):
    if args.no_progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=args.steps, desc=f"{name:>5}", unit="step", dynamic_ncols=True)


@torch.no_grad()
def evaluate(model: GPT, corpus: Corpus, args: argparse.Namespace, device: torch.device) -> float:
    """Mean loss over fixed held-out batches (the same for both runs)."""
    model.eval()
    batches = Batches(corpus.val, args.batch_size, args.context, seed=10_000 + args.seed)
    losses = [float(model(*(t.to(device) for t in batches.next()))) for _ in range(VAL_BATCHES)]
    model.train()
    return sum(losses) / len(losses)


def surge_ratio(values: list[float]) -> float:
    """Mean of the last 10% of `values` over the smallest mean of any window of the same length
    lying inside the middle of training, [T/4, 3T/4). Window means (rather than single steps)
    keep one lucky low-noise step from inflating the ratio."""
    t = len(values)
    w = max(1, t // 10)
    x = torch.tensor(values, dtype=torch.float64)
    middle = x[t // 4: (3 * t) // 4]
    mid_min = middle.unfold(0, w, 1).mean(dim=1).min() if len(middle) >= w else middle.mean()
    return float(x[-w:].mean() / mid_min)


def summarize(results: list[RunResult]) -> dict:
    summary = {}
    for r in results:
        t = len(r.steps)
        w = max(1, t // 10)
        losses = [s["loss"] for s in r.steps]
        gnorm = [s["global"]["grad_norm"] for s in r.steps]
        ratio = [s["normalized"]["g_over_w"] for s in r.steps]
        summary[r.name] = {
            "val_loss": r.val_loss,
            "train_loss_last_10pct": sum(losses[-w:]) / w,
            "grad_norm_last_10pct": sum(gnorm[-w:]) / w,
            "surge_ratio": surge_ratio(gnorm),
            "g_over_w_surge_ratio": surge_ratio(ratio),
            "seconds": r.seconds,
            "ms_per_step": 1e3 * r.seconds / t,
        }
    return summary


def print_summary(summary: dict, corpus: Corpus) -> None:
    header = (f"{'run':<6} {'val loss':>9} {'train loss':>11} {'grad norm':>10} "
              f"{'surge':>7} {'g/w surge':>10} {'ms/step':>8}")
    print()
    print(header)
    print("-" * len(header))
    for name, s in summary.items():
        print(f"{name:<6} {s['val_loss']:>9.4f} {s['train_loss_last_10pct']:>11.4f} "
              f"{s['grad_norm_last_10pct']:>10.4f} {s['surge_ratio']:>7.2f} "
              f"{s['g_over_w_surge_ratio']:>10.2f} {s['ms_per_step']:>8.1f}")
    print(f"\nlosses in nats/token; unigram entropy of the data {corpus.unigram_entropy():.3f}")
    print("train loss and grad norm: means over the last 10% of steps")
    print("surge: mean global grad norm over the last 10% of steps / its smallest 10%-window "
          "mean in steps [T/4, 3T/4)")
    print("g/w surge: the same for the mean ||g||/||w|| of the normalized layers")


def plot(results: list[RunResult], args: argparse.Namespace, device: torch.device,
         path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    (ax_loss, ax_gnorm, ax_lr), (ax_ratio_w, ax_ratio_c, ax_wnorm) = axes
    smooth = max(1, len(results[0].steps) // 100)
    ratio_max = 0.0
    for r in results:
        steps = [s["step"] for s in r.steps]
        color = COLORS[r.name]
        ax_loss.plot(steps, _moving_mean([s["loss"] for s in r.steps], smooth), color=color,
                     label=f"{r.name} (val {r.val_loss:.3f})")
        ax_gnorm.plot(steps, [s["global"]["grad_norm"] for s in r.steps], color=color, alpha=0.25,
                      lw=0.6)
        ax_gnorm.plot(steps, _moving_mean([s["global"]["grad_norm"] for s in r.steps], smooth),
                      color=color, label=r.name)
        ax_lr.plot(steps, [s["lr"] for s in r.steps], color=color, label=r.name,
                   ls="-" if r.name == "AdamW" else "--")
        ax_wnorm.plot(steps, [s["normalized"]["weight_norm"] for s in r.steps], color=color,
                      label=r.name)
        ax_ratio = ax_ratio_w if r.name == "AdamW" else ax_ratio_c
        cmap = plt.get_cmap("viridis")
        for i, n in enumerate(r.normalized):
            ratio = _moving_mean(r.layer_ratios[n], smooth)
            ratio_max = max(ratio_max, max(ratio))
            ax_ratio.plot(steps, ratio, color=cmap(i / max(1, len(r.normalized) - 1)), lw=1,
                          label=n.removesuffix(".weight"))
        ax_ratio.set_title(f"{r.name}: ||g|| / ||w|| of each normalized layer")
    t = len(results[0].steps)
    for ax in (ax_gnorm, ax_ratio_w, ax_ratio_c):
        ax.axvspan(t // 4, (3 * t) // 4, color="0.9", zorder=0)
        ax.axvspan(t - t // 10, t, color="mistyrose", zorder=0)
    ax_loss.set_title("training loss")
    ax_loss.set_ylim(top=min(ax_loss.get_ylim()[1], 2 * max(r.steps[-1]["loss"] for r in results)
                             + 0.5))
    # The warmup spike would squash the part that matters, the middle and the end.
    late = [v for r in results
            for v in _moving_mean([s["global"]["grad_norm"] for s in r.steps], smooth)[t // 4:]]
    ax_gnorm.set_ylim(0, 1.6 * max(late))
    ax_gnorm.set_title("global grad norm (before clipping)")
    ax_gnorm.text(0.02, 0.95, "grey: middle [T/4, 3T/4)\nred: last 10%",
                  transform=ax_gnorm.transAxes, va="top", fontsize=8)
    ax_lr.set_title("learning rate (same schedule in both runs)")
    ax_wnorm.set_title("||w|| of the normalized layers (all together)")
    for ax in (ax_ratio_w, ax_ratio_c):
        ax.set_yscale("log")
        ax.set_ylim(top=ratio_max * 1.5)
    ax_ratio_c.sharey(ax_ratio_w)
    ax_ratio_w.legend(fontsize=7, ncol=2, loc="upper left")
    for ax in (ax_loss, ax_gnorm, ax_lr, ax_wnorm):
        ax.legend(fontsize=9)
    for ax in axes.flat:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(
        f"AdamW vs AdamC: {args.n_layer}-layer GPT (d={args.d_model}), {args.steps} steps, "
        f"peak lr {args.lr:g}, wd {args.wd:g}, warmup {args.warmup:g} + cosine to 0, "
        f"clip {MAX_GRAD_NORM:g}; {device.type}"
        + (f" (curves: {smooth}-step moving means)" if smooth > 1 else ""),
        fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _moving_mean(values: list[float], window: int) -> list[float]:
    """Trailing moving mean; the first steps average over what exists so far."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def _summary_writer(log_dir: Path):
    # Imported here: tensorboard is optional and only --tensorboard needs it.
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise SystemExit(f"--tensorboard needs the tensorboard package (pip install tensorboard): {e}")
    return SummaryWriter(str(log_dir))


def _check_packages(args: argparse.Namespace) -> None:
    """Stop before training, not after it, when the figure or the progress bars cannot be made."""
    needed = ["matplotlib"] + ([] if args.no_progress else ["tqdm"])
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise SystemExit(f"the demo needs {' and '.join(missing)}: pip install "
                         f"{' '.join(missing)} (or, in the checkout, pip install -e \".[demo]\")")


def main(argv: list[str] | None = None, prog: str = "python -m fusedopt demo") -> dict:
    args = parse_args(argv, prog)
    _check_packages(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # The backend `args.backend` resolves to here (an error now rather than after the data).
    backend = backends.resolve(args.backend, device, [torch.float32])
    corpus = load_file(args.data) if args.data else generate_corpus()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"data: {corpus.description}, {len(corpus.train)} train tokens, vocab "
          f"{corpus.vocab_size}, unigram entropy {corpus.unigram_entropy():.3f} nats")
    backend_note = f"{args.backend} -> {backend}" if args.backend == "auto" else backend
    print(f"device: {device}, backend: {backend_note}, threads: {torch.get_num_threads()}, "
          f"steps: {args.steps}, lr: {args.lr:g}, wd: {args.wd:g}")
    if device.type == "cuda" and args.backend == "auto" and backend == "reference":
        print("note: neither Triton nor the CUDA extension fusedopt._C is available, so the "
              "PyTorch reference runs; `python -m fusedopt info` says why")
    print(f"output: {out.resolve()}")

    results = []
    for name in RUNS:
        writer = _summary_writer(Path(args.tensorboard) / name) if args.tensorboard else None
        results.append(train(name, args, corpus, device, writer))
        if writer is not None:
            writer.close()

    with open(out / "steps.jsonl", "w") as f:
        for r in results:
            for s in r.steps:
                f.write(json.dumps(s) + "\n")
    summary = summarize(results)
    settings = {k: v for k, v in vars(args).items() if k != "no_progress"}
    (out / "summary.json").write_text(json.dumps(
        {"settings": settings, "device": str(device), "data": corpus.description,
         "unigram_entropy": corpus.unigram_entropy(), "runs": summary}, indent=2))
    plot(results, args, device, out / "demo.png")
    print_summary(summary, corpus)
    print(f"\nwrote to {out.resolve()}:")
    for file_name in ("demo.png", "steps.jsonl", "summary.json"):
        print(f"  {file_name:<13} {_size(out / file_name)}")
    return summary


def _size(path: Path) -> str:
    size = path.stat().st_size
    return f"{size / 1e6:.1f} MB" if size >= 1e6 else f"{size / 1e3:.0f} kB"


def cli() -> int:
    """The fusedopt-demo console script (its return value is the exit status, so not main's)."""
    main(prog="fusedopt-demo")
    return 0


if __name__ == "__main__":
    main()
