"""Where the host's time goes in one fused step: the eager step at many tensors is bound by the
host (bench/NOTES.md: 1200 tensors take 1.4-1.5 ms eager against 0.75 ms replayed as a CUDA
graph), so this times the Python side of fusedopt's step alone and profiles it.

  python bench/profile_host.py                          # convnet_1200 fp32 on the GPU, Triton
  python bench/profile_host.py --device cpu --backend reference --shape tiny   # smoke run

Reports the host milliseconds a step takes to return (the GPU runs behind it; each step is
timed with perf_counter, no synchronization inside the timed steps) and cProfile's top functions
by their own time over the same number of steps.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_step  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="convnet_1200", choices=sorted(bench_step.SHAPES))
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--backend", default="triton", choices=["auto", "reference", "triton", "cuda"])
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--top", type=int, default=25, help="functions listed from the profile")
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    import fusedopt

    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    params = bench_step.make_params(bench_step.SHAPES[args.shape](), dtype, device)
    opt = fusedopt.AdamW(params, max_grad_norm=1.0, backend=args.backend)
    for _ in range(5):  # compiles, creates the state, uploads the tables
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    host_ms = []
    for _ in range(args.steps):
        start = time.perf_counter()
        opt.step()
        host_ms.append((time.perf_counter() - start) * 1e3)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    quartiles = statistics.quantiles(host_ms, n=5)
    print(f"{args.shape} {args.dtype} backend {args.backend}, {len(params)} tensors: host "
          f"{statistics.median(host_ms):.3f} ms a step (p20 {quartiles[0]:.3f}, p80 "
          f"{quartiles[-1]:.3f}) over {args.steps} steps")
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(args.steps):
        opt.step()
    profile.disable()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(args.top)
    print(text.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
