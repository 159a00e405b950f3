"""What is live at a training iteration's memory peak, one pipeline against another.

bench_e2e.py reports max_memory_allocated; where two pipelines' peaks differ by a megabyte, this
says which allocations make the difference. Per pipeline (bench_e2e's models and pipelines, each
built fresh after the last one's memory is released): the caching allocator's history is recorded
from before the model is built through the warm-up iterations and one more. The trace's alloc and
free_completed events, replayed from memory_allocated() at the start, give the bytes live after
each event; at the highest point the live allocations are grouped by size and by the innermost
frame of fusedopt, bench or transformers code that made them. Beside it, memory_stats' peaks of
allocated and of requested bytes: a difference in allocated bytes that requested bytes do not
show is the allocator's rounding (a request served whole by a larger cached block), not more data.

  python bench/memory_peak.py --model llama_1b \
      --pipelines torch_fused_clip,fusedopt_adamw --out $OUT
"""
from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_e2e  # noqa: E402

MB = 1e6
# Frames from these paths name an allocation; torch's own frames are skipped to reach them.
OWN_CODE = ("fusedopt", "bench", "transformers")


def where(frames) -> str:
    """The innermost frame in OWN_CODE, as file:line function; '?' without one."""
    for f in frames or ():
        name = f.get("filename", "")
        if any(part in name for part in OWN_CODE) and "/torch/" not in name:
            return f"{os.path.basename(name)}:{f.get('line')} {f.get('name')}"
    return "?"


def live_at_peak(trace, base: int) -> dict:
    """Replay alloc / free_completed events from `base` live bytes. Returns the peak bytes, the
    event index it was reached at, and the allocations live there as {(size, where): count}
    (allocations made before the trace started are in `base`, not in the groups)."""
    live, now, peak, at, best = {}, base, base, -1, {}
    for i, event in enumerate(trace):
        action = event["action"]
        if action == "alloc":
            live[event["addr"]] = (event["size"], where(event.get("frames")))
            now += event["size"]
            if now > peak:
                peak, at, best = now, i, dict(live)
        elif action == "free_completed" and event["addr"] in live:
            now -= live.pop(event["addr"])[0]
    groups = collections.Counter(best.values())
    return {"peak_bytes": peak, "event": at, "groups": groups}


def group_rows(groups: collections.Counter) -> list[dict]:
    return sorted(({"size": size, "where": place, "count": count, "bytes": size * count}
                   for (size, place), count in groups.items()),
                  key=lambda r: (-r["bytes"], r["where"]))


def difference(a: collections.Counter, b: collections.Counter) -> list[dict]:
    """Groups live at a's peak and not at b's (positive count) or the other way (negative)."""
    keys = set(a) | set(b)
    rows = [{"size": size, "where": place, "count": a[(size, place)] - b[(size, place)],
             "bytes": size * (a[(size, place)] - b[(size, place)])}
            for size, place in keys if a[(size, place)] != b[(size, place)]]
    return sorted(rows, key=lambda r: (-abs(r["bytes"]), r["where"]))


def record(model, pipeline, device, args) -> dict:
    """Build and run one pipeline under the allocator's history; returns its peak figures."""
    bench_e2e.free_memory(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.memory._record_memory_history("all", context="alloc", stacks="python",
                                             max_entries=args.max_entries, clear_history=True)
    try:
        net = bench_e2e.build_model(model, device, args.seed)
        if pipeline.bf16_params:
            net = net.to(torch.bfloat16)
        params = list(net.parameters())
        batches = bench_e2e.make_batches(model, net.config.vocab_size, args.iters, device,
                                         args.seed)
        training = pipeline.build(params, device)
        for i in range(args.iters):
            if i == args.iters - 1:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            if pipeline.autocast is None:
                loss = net(input_ids=batches[i], labels=batches[i]).loss
            else:
                with torch.autocast(device.type, dtype=pipeline.autocast):
                    loss = net(input_ids=batches[i], labels=batches[i]).loss
            training.backward(loss)
            training.optimizer_part()
        torch.cuda.synchronize(device)
        stats = torch.cuda.memory_stats(device)
        snapshot = torch.cuda.memory._snapshot(device)
    finally:
        torch.cuda.memory._record_memory_history(None)
    trace = snapshot["device_traces"][device.index or 0]
    replay = live_at_peak(trace, base)
    del net, params, batches, training
    gc.collect()
    return {"pipeline": pipeline.name,
            "allocated_peak": stats["allocated_bytes.all.peak"],
            "requested_peak": stats["requested_bytes.all.peak"],
            "trace_peak": replay["peak_bytes"], "trace_events": len(trace),
            "peak_event": replay["event"], "groups": replay["groups"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama_1b", choices=sorted(bench_e2e.MODELS))
    ap.add_argument("--pipelines", default="torch_fused_clip,fusedopt_adamw",
                    help="comma list of bench_e2e pipelines; the first is compared with the rest")
    ap.add_argument("--iters", type=int, default=3,
                    help="iterations in all; the peak statistics cover the last one")
    ap.add_argument("--max-entries", type=int, default=2_000_000)
    ap.add_argument("--backend", default="auto", choices=("auto", "triton", "cuda"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--top", type=int, default=12, help="rows of each difference table")
    ap.add_argument("--out", default=None, help="folder for memory_peak_<model>.json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("memory_peak.py needs a CUDA device (the caching allocator's history)",
              file=sys.stderr)
        return 2
    device = torch.device("cuda")
    bench_e2e.BACKEND = args.backend
    model = bench_e2e.MODELS[args.model]
    names = [n for n in args.pipelines.split(",") if n]
    unknown = [n for n in names if n not in bench_e2e.PIPELINES]
    if unknown or len(names) < 2:
        ap.error(f"--pipelines: two or more of {list(bench_e2e.PIPELINES)} (unknown: {unknown})")
    results = [record(model, bench_e2e.PIPELINES[n], device, args) for n in names]
    first = results[0]
    lines = [f"# memory at the peak, {args.model}", "",
             "| pipeline | allocated peak MB | requested peak MB | trace peak MB | vs first: "
             "allocated / requested MB |", "|---|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['pipeline']} | {r['allocated_peak'] / MB:.3f} | "
                     f"{r['requested_peak'] / MB:.3f} | {r['trace_peak'] / MB:.3f} | "
                     f"{(r['allocated_peak'] - first['allocated_peak']) / MB:+.3f} / "
                     f"{(r['requested_peak'] - first['requested_peak']) / MB:+.3f} |")
    for r in results[1:]:
        lines += ["", f"## live at {r['pipeline']}'s peak and not at {first['pipeline']}'s "
                  "(negative: the other way)", "", "| bytes | size | count | where |",
                  "|---:|---:|---:|---|"]
        for d in difference(r["groups"], first["groups"])[:args.top]:
            lines.append(f"| {d['bytes']} | {d['size']} | {d['count']} | {d['where']} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"memory_peak_{args.model}.json")
        with open(path, "w") as f:
            json.dump([{**r, "groups": group_rows(r["groups"])} for r in results], f, indent=1)
        with open(os.path.join(args.out, f"memory_peak_{args.model}.md"), "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
