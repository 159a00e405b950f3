"""Training iterations of LLaMA-1B under FSDP2: torch's optimizer on DTensors against fusedopt's.

Launched with torchrun, one process per GPU (1 GPU: FSDP2 over a mesh of one, for scale):

  torchrun --standalone --nproc_per_node 2 bench/bench_fsdp.py --out $OUT
  torchrun --standalone --nproc_per_node 2 bench/bench_fsdp.py --device cpu --model tiny_llama \
      --iters 2 --warmup 1 --out /tmp/fsdp                       # the CPU smoke run (gloo)

The model (bench_e2e.py's llama_1b: TinyLlama-1.1B's shape, random init from one seed) is built
on every rank, each decoder layer and then the root wrapped with fully_shard, with a bf16 mixed
precision policy (bf16 compute and all-gathers, fp32 sharded params and gradient
reduce-scatter). Every rank trains on its own random batch of 4 x 1024 tokens.

Pipelines (lr 3e-4, betas (0.9, 0.95), weight decay 0.1, clip at global norm 1.0):
  torch_fused_clip     clip_grad_norm_ over the DTensor params + torch.optim.AdamW(fused=True)
  torch_foreach_clip   the same with AdamW(foreach=True), torch's default
  fusedopt_adamc       fusedopt.AdamC(max_grad_norm=1.0): one all-reduce for the norm
  fusedopt_adamc_stats the same with stats=True (two more all-reduces of the statistics)
Each ends with zero_grad(set_to_none=True).

Per iteration, as bench_e2e.py: CUDA events at four points (forward | backward | optimizer part,
GPU time, including any time the GPU waits on the host to launch), the host wall time of the
optimizer part (perf_counter), one synchronize at the end. Rank 0's times are reported (every
rank runs the same program); peak memory is max_memory_allocated per rank over the timed
iterations, all ranks listed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_e2e  # noqa: E402
import bench_step  # noqa: E402
from bench_e2e import BETAS, GB, LR, MAX_GRAD_NORM, WEIGHT_DECAY  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torch_builder(fused):
    def build(params):
        opt = torch.optim.AdamW(params, lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY,
                                fused=fused, foreach=not fused)

        def optimizer_part():
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return optimizer_part, f"clip_grad_norm_ + torch.optim.AdamW({'fused' if fused else 'foreach'}=True)"
    return build


def fusedopt_builder(stats):
    def build(params):
        import fusedopt
        backend = "auto" if params[0].device.type == "cuda" else "reference"
        opt = fusedopt.AdamC(params, lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY,
                             max_grad_norm=MAX_GRAD_NORM, backend=backend, stats=stats)

        def optimizer_part():
            opt.step()
            opt.zero_grad(set_to_none=True)
        return optimizer_part, f"fusedopt.AdamC(max_grad_norm={MAX_GRAD_NORM}, stats={stats}, backend={backend!r})"
    return build


PIPELINES = {"torch_fused_clip": torch_builder(True), "torch_foreach_clip": torch_builder(False),
             "fusedopt_adamc": fusedopt_builder(False), "fusedopt_adamc_stats": fusedopt_builder(True)}
BASELINE = "torch_fused_clip"


def sharded_model(model, device, seed):
    net = bench_e2e.build_model(model, device, seed)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in net.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(net, mesh=mesh, mp_policy=policy)
    return net


def measure(model, name, device, args):
    rank = dist.get_rank()
    net = sharded_model(model, device, args.seed)
    params = list(net.parameters())
    tokens = bench_e2e.make_batches(model, net.config.vocab_size, args.warmup + args.iters, device,
                                    args.seed + rank)
    optimizer_part, what = PIPELINES[name](params)

    def iteration(batch):
        t0 = bench_e2e.mark(device)
        loss = net(input_ids=batch, labels=batch).loss
        t1 = bench_e2e.mark(device)
        loss.backward()
        t2 = bench_e2e.mark(device)
        host0 = time.perf_counter()
        optimizer_part()
        host_ms = (time.perf_counter() - host0) * 1e3
        t3 = bench_e2e.mark(device)
        bench_e2e.sync(device)
        return (t0, t1, t2, t3), host_ms, loss.detach()

    marks, host, losses, _ = bench_e2e.timed_iterations(iteration, tokens, device, args)
    row = {"pipeline": name, "optimizer": what, "status": "ok",
           "n_params": sum(p.numel() for p in params), **bench_e2e.iteration_figures(marks, host)}
    losses = [float(loss) for loss in losses]
    peak = torch.cuda.max_memory_allocated(device) / GB if device.type == "cuda" else None
    peaks = [None] * dist.get_world_size()
    dist.all_gather_object(peaks, peak)
    row["peak_gb_per_rank"] = peaks
    row["peak_gb"] = max(peaks) if peaks[0] is not None else None
    row["loss_first"], row["loss_last"] = losses[0], losses[-1]
    return row


def markdown(header, rows):
    world = header["world_size"]
    lines = [f"# {header['name']}", ""] + [f"- {k}: {v}" for k, v in header.items() if k != "name"]
    lines += ["", f"{header['model']} under FSDP2 on {world} rank(s), bf16 mixed precision policy, batch "
              "4 x 1024 tokens per rank. Times in ms, rank 0: median (p20-p80). opt = clip + step + "
              "zero_grad (GPU time, events); opt host = its host wall time. Peak GB: the largest "
              "rank's max_memory_allocated (1e9 bytes).", "",
              "| pipeline | iter ms | fwd ms | bwd ms | opt ms | opt host ms | peak GB (per rank) "
              "| loss first -> last | optimizer |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    timed = bench_e2e._timed
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['pipeline']} | {r['status']}: {r.get('note', '')} |||||||")
            continue
        peaks = ", ".join(f"{p:.2f}" for p in r["peak_gb_per_rank"] if p is not None)
        lines.append(f"| {r['pipeline']} | {timed(r['iter_ms'])} | {timed(r['fwd_ms'])} "
                     f"| {timed(r['bwd_ms'])} | {timed(r['opt_ms'])} | {timed(r['opt_host_ms'])} "
                     f"| {peaks or '-'} | {r['loss_first']:.3f} -> {r['loss_last']:.3f} "
                     f"| {r['optimizer']} |")
    base = next((r for r in rows if r["pipeline"] == BASELINE and r["status"] == "ok"), None)
    if base:
        lines += ["", f"Against {BASELINE} (x = torch / fusedopt, medians):", "",
                  "| pipeline | iter delta ms | opt x (GPU) | opt host x | peak delta GB |",
                  "|---|---:|---:|---:|---:|"]
        for r in rows:
            if r["status"] != "ok" or r is base:
                continue
            med = lambda row, k: row[k]["median"]  # noqa: E731
            peak = ("-" if r["peak_gb"] is None else f"{r['peak_gb'] - base['peak_gb']:+.3f}")
            lines.append(f"| {r['pipeline']} | {med(r, 'iter_ms') - med(base, 'iter_ms'):+.2f} "
                         f"| {med(base, 'opt_ms') / med(r, 'opt_ms'):.2f} "
                         f"| {med(base, 'opt_host_ms') / med(r, 'opt_host_ms'):.2f} | {peak} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama_1b", choices=sorted(bench_e2e.MODELS))
    ap.add_argument("--pipelines", default="all", help=f"'all' or a comma list of {list(PIPELINES)}")
    ap.add_argument("--iters", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--out", default=os.path.join(REPO, "bench", "results"))
    ap.add_argument("--name", default=None, help="results stem; default fsdp_<N>gpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.pipelines = list(PIPELINES) if args.pipelines == "all" else args.pipelines.split(",")
    device_type = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    commit, dirty = bench_step.git_commit()
    header = {"name": args.name or f"fsdp_{world}{'gpu' if device.type == 'cuda' else 'cpu'}",
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "world_size": world, "model": args.model, "torch": torch.__version__,
              "fusedopt_cuda_ext": bench_e2e.fusedopt_import("fusedopt._C"),
              "git_commit": commit, "git_dirty": dirty, "iters": args.iters, "warmup": args.warmup,
              "nccl_nvls_enable": os.environ.get("NCCL_NVLS_ENABLE")}
    rows = []
    model = bench_e2e.MODELS[args.model]
    for name in args.pipelines:
        t0 = time.time()
        try:
            row = measure(model, name, device, args)
        except Exception as e:  # one broken pipeline must not cost the others their rows
            row = {"pipeline": name, "status": "error", "note": bench_e2e.first_line(e)}
        bench_e2e.free_memory(device)  # the model and the optimizer went with measure()
        row["wall_s"] = round(time.time() - t0, 1)
        rows.append(row)
        if rank == 0:
            print(f"{name:22s} {row['status']} iter {bench_e2e._timed(row.get('iter_ms'))} opt "
                  f"{bench_e2e._timed(row.get('opt_ms'))} host {bench_e2e._timed(row.get('opt_host_ms'))} "
                  f"peak {row.get('peak_gb')} [{row['wall_s']} s] {row.get('note', '')}", flush=True)
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, header["name"] + ".json"), "w") as f:
                json.dump({"header": header, "rows": rows}, f, indent=1)
            with open(os.path.join(args.out, header["name"] + ".md"), "w") as f:
                f.write(markdown(header, rows))
    if rank == 0:
        print(markdown(header, rows))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
