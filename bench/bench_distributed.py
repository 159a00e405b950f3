"""The sharded (ZeRO-1) fused step against DDP-style all-reduce + the fused step and the fused step
on one GPU, at real model shapes, on every GPU of one host (NCCL).

What is timed per provider (gradients already in place, no forward/backward; every rank runs the
same step, rank 0's CUDA-event times are reported):
  fused_1gpu       fusedopt.AdamC(max_grad_norm=1.0).step() on each GPU's own copy, no
                   communication: the single-GPU fused step
  allreduce_fused  dist.all_reduce(flat grads, AVG) + the same step: the gradient sync DDP does
                   in its buckets, here not overlapped with a backward, then the full step
  sharded          fusedopt.distributed.ShardedOptimizer over the same AdamC: reduce-scatter of
                   the flat grads, the fused step on 1/W of the blocks, all-gather of the params

Communication per step (ring algorithms, W GPUs, s bytes per grad/param element, N elements):
all-reduce 2 (W - 1) / W * N * s; reduce-scatter + all-gather the same 2 (W - 1) / W * N * s.
So the sharded step moves as many bytes as DDP, runs the update over N / W elements and keeps
1 / W of the moments (8 B per element for Adam's fp32 m and v).
Memory per rank: "state MiB" is the optimizer state (moments) each rank holds, "peak MiB" the
step's peak allocation above the params and grads.

  python bench/bench_distributed.py --out-dir $OUT                 # all GPUs of the host
  python bench/bench_distributed.py --dry-run                       # 2 CPU processes, gloo
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import socket
import sys
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_report  # noqa: E402
import bench_step  # noqa: E402

from fusedopt.flat import BLOCK, padded  # noqa: E402

PROVIDERS = ("fused_1gpu", "allreduce_fused", "sharded")
# Adam's moments: fp32 m and v for every param dtype.
MOMENT_BYTES = 8


def state_bytes_per_rank(shapes, world_size: int) -> int:
    """Adam moment bytes on one rank of a ShardedOptimizer over one flat buffer of these shapes:
    ceil(blocks / W) whole blocks (world_size 1: the unsharded optimizer)."""
    blocks = sum(padded(bench_step.numel(s)) for _, s in shapes) // BLOCK
    return -(-blocks // world_size) * BLOCK * MOMENT_BYTES


def build(provider, params, device, backend):
    import fusedopt
    from fusedopt.distributed import ShardedOptimizer

    opt = fusedopt.AdamC(params, lr=bench_step.LR, betas=bench_step.BETAS, eps=bench_step.EPS,
                         weight_decay=bench_step.WEIGHT_DECAY,
                         max_grad_norm=bench_step.MAX_GRAD_NORM, backend=backend)
    if provider == "fused_1gpu":
        return opt, opt.step
    if provider == "allreduce_fused":
        grads = [buf.grad for ds in opt._devices.values() for buf in ds.buffers]

        def step():
            for grad in grads:
                dist.all_reduce(grad, op=dist.ReduceOp.AVG)
            opt.step()

        return opt, step
    sharded = ShardedOptimizer(opt)
    return sharded, sharded.step


def time_steps(step, device, warmup, iters):
    """Per-step milliseconds: CUDA events around each step on a GPU, wall time on the CPU."""
    for _ in range(warmup):
        step()
    samples = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            samples.append((time.perf_counter() - t0) * 1e3)
    return samples


def agree(flag: bool, device) -> bool:
    """Every rank goes on only if all do (the time budget is read on each rank's own clock)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() > 0)


def run_one(provider, shape, dtype, device, args):
    shapes = bench_step.SHAPES[shape]()
    params = bench_step.make_params(shapes, bench_step.DTYPES[dtype], device, seed=args.seed)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    opt, step = build(provider, params, device, args.backend)
    samples = time_steps(step, device, args.warmup, args.iters)
    world = dist.get_world_size()
    state = (opt.memory()["state"] if provider == "sharded"
             else state_bytes_per_rank(shapes, 1))
    row = {"shape": shape, "dtype": dtype, "provider": provider, "world_size": world,
           "n_params": sum(p.numel() for p in params), "backend": opt._devices[device].backend,
           "median_ms": bench_report.percentile(samples, 50),
           "p20_ms": bench_report.percentile(samples, 20),
           "p80_ms": bench_report.percentile(samples, 80),
           "state_mib": state / 2**20, "status": "ok"}
    if device.type == "cuda":
        row["peak_mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    del opt, step, params
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def worker(rank, world, port, args):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    cuda = not args.dry_run
    if cuda:
        torch.cuda.set_device(rank)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=max(60, args.time_budget_s)),
                            **({"device_id": device} if cuda else {}))
    start = time.monotonic()
    rows = []
    try:
        for shape in args.shapes:
            for dtype in args.dtypes:
                for provider in args.providers:
                    left = args.time_budget_s - (time.monotonic() - start)
                    if not agree(left > args.min_left_s, device):
                        rows.append({"shape": shape, "dtype": dtype, "provider": provider,
                                     "world_size": world, "status": "skipped",
                                     "note": "time budget spent"})
                        continue
                    try:
                        rows.append(run_one(provider, shape, dtype, device, args))
                    except Exception as error:  # one failed row must not lose the others
                        traceback.print_exc()
                        rows.append({"shape": shape, "dtype": dtype, "provider": provider,
                                     "world_size": world, "status": "error",
                                     "note": f"{type(error).__name__}: {error}"[:300]})
                        gc.collect()
                        if cuda:
                            torch.cuda.empty_cache()
                    if rank == 0:
                        write(args, rows, world)
        # Every rank done before teardown (gloo can abort a rank whose peer leaves early).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def add_ratios(rows):
    """speedup_vs_<provider>: that provider's median / this row's, same shape and dtype."""
    for row in rows:
        for other in rows:
            if (row.get("status") == "ok" and other.get("status") == "ok"
                    and (row["shape"], row["dtype"]) == (other["shape"], other["dtype"])
                    and other["provider"] != row["provider"]):
                row[f"speedup_vs_{other['provider']}"] = other["median_ms"] / row["median_ms"]


def memory_table(shapes_names, worlds=(1, 2, 4, 8)):
    lines = ["| shape | " + " | ".join(f"W={w} state MiB/rank" for w in worlds) + " |",
             "|---" * (len(worlds) + 1) + "|"]
    for shape in shapes_names:
        shapes = bench_step.SHAPES[shape]()
        lines.append(f"| {shape} | " + " | ".join(
            f"{state_bytes_per_rank(shapes, w) / 2**20:.0f}" for w in worlds) + " |")
    return lines


def markdown(header, rows):
    out = [f"# Distributed step, {header['world_size']} x {header['device']}", "",
           f"torch {header['torch']}, commit {header['git_commit']}, {header['date']}; "
           "rank 0's times, median [p20, p80] ms per step; AdamC, max_grad_norm=1.0, no scaler.", "",
           "| shape | dtype | provider | backend | median ms | p20-p80 ms | vs fused_1gpu | "
           "vs allreduce_fused | state MiB/rank | peak MiB | status |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("status") != "ok":
            out.append(f"| {r['shape']} | {r['dtype']} | {r['provider']} | | | | | | | | "
                       f"{r['status']}: {r.get('note', '')} |")
            continue
        out.append(
            f"| {r['shape']} | {r['dtype']} | {r['provider']} | {r['backend']} | "
            f"{r['median_ms']:.2f} | {r['p20_ms']:.2f}-{r['p80_ms']:.2f} | "
            f"{r.get('speedup_vs_fused_1gpu', 1.0):.2f}x | "
            f"{r.get('speedup_vs_allreduce_fused', 1.0):.2f}x | {r['state_mib']:.1f} | "
            f"{r.get('peak_mib', float('nan')):.0f} | ok |")
    out += ["", "Adam state per rank by world size (analytic, whole BLOCKs per rank):", ""]
    out += memory_table(sorted({r["shape"] for r in rows}))
    return "\n".join(out) + "\n"


def write(args, rows, world):
    rows = [dict(r) for r in rows]
    add_ratios(rows)
    device = (torch.cuda.get_device_name(0) if not args.dry_run else platform.processor() or "cpu")
    header = {"device": device, "world_size": world, "torch": torch.__version__,
              "git_commit": os.environ.get("GIT_COMMIT", "unknown"),
              "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "command": " ".join(sys.argv), "nccl_nvls_enable": os.environ.get("NCCL_NVLS_ENABLE")}
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, args.name)
    with open(stem + ".json", "w") as f:
        json.dump({"header": header, "rows": rows}, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(markdown(header, rows))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out-dir", default=None, help="where <name>.json and <name>.md go")
    ap.add_argument("--name", default="distributed")
    ap.add_argument("--shapes", default="llama_1b", help="comma list of bench_step.py shapes")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--world-size", type=int, default=0, help="GPUs to use (default: all)")
    ap.add_argument("--backend", default="auto", help="fusedopt backend of the fused step")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time-budget-s", type=float, default=300,
                    help="no provider starts after this many seconds (each row takes well under 30 s)")
    ap.add_argument("--min-left-s", type=float, default=30,
                    help="start a provider only with at least this much budget left")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU smoke run: 2 gloo processes, tiny shapes, reference backend")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.shapes, args.dtypes, args.backend = "tiny", "fp32", "reference"
        args.world_size, args.warmup, args.iters = 2, 1, 2
        args.out_dir = args.out_dir or tempfile.mkdtemp(prefix="bench_distributed_")
    if args.out_dir is None:
        ap.error("--out-dir is required (except with --dry-run)")
    args.shapes, args.dtypes = args.shapes.split(","), args.dtypes.split(",")
    args.providers = args.providers.split(",")
    for key, known in (("shapes", bench_step.SHAPES), ("dtypes", bench_step.DTYPES),
                       ("providers", PROVIDERS)):
        bad = [x for x in getattr(args, key) if x not in known]
        if bad:
            ap.error(f"--{key}: unknown {bad}; known: {sorted(known)}")
    world = args.world_size or (torch.cuda.device_count() if not args.dry_run else 2)
    if world < 2 or (not args.dry_run and world > torch.cuda.device_count()):
        ap.error(f"--world-size: needs 2..{torch.cuda.device_count()} GPUs here, got {world} "
                 "(use --dry-run without GPUs)")
    mp.spawn(worker, args=(world, free_port(), args), nprocs=world)
    md = os.path.join(args.out_dir, args.name + ".md")
    if os.path.exists(md):
        with open(md) as f:
            print(f.read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
