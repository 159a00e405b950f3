"""Whole training iterations of real transformers models: torch's optimizer pipelines against fusedopt's.

bench_step.py times the optimizer step alone; this script times what a user pays per iteration:
forward, backward, the optimizer part and the peak memory, on randomly initialised Hugging Face
models fed random tokens (fixed seed, no tokenizer, no download).

Models (parameters counted by model.parameters(), tied weights once):
  llama_1b    TinyLlama-1.1B's shape: LlamaConfig(d 2048, ffn 5632, 22 layers, 32 heads, 4 KV heads,
              vocab 32000), sdpa attention; 1,100,048,384 params; batch 4 x 1024 tokens
  gpt2_124m   GPT2Config() (d 768, 12 layers, vocab 50257, head tied to wte), sdpa attention;
              124,439,808 params; batch 8 x 1024 tokens
  tiny        tiny_llama and tiny_gpt2: 2 layers, d 64, vocab 256, batch 2 x 64; the CPU smoke test

Pipelines (lr 3e-4, betas (0.9, 0.95), weight decay 0.1, clip at global norm 1.0 in all of them):
  torch_fused_clip      fp32 params, bf16 autocast; clip_grad_norm_ + AdamW(fused=True)
  torch_fp16_scaler     fp32 params, fp16 autocast; torch.amp.GradScaler: unscale_, clip_grad_norm_,
                        step, update; AdamW(fused=True)
  fusedopt_adamw        fp32 params, bf16 autocast; fusedopt.AdamW(max_grad_norm=1.0)
  fusedopt_adamc_stats  the same with fusedopt.AdamC(stats=True); the stats are never read here
  fusedopt_fp16_scaler  fp16 autocast; fusedopt.GradScaler: scale(loss).backward(), step, update
  torch_bf16_params     model.to(bfloat16), no autocast; clip_grad_norm_ + AdamW(fused=True)
  fusedopt_bf16_params  model.to(bfloat16), no autocast; fusedopt.AdamW(max_grad_norm=1.0)
Every pipeline ends with zero_grad(set_to_none=True). Compared pairs (fusedopt vs torch):
adamw and adamc_stats vs torch_fused_clip, fp16_scaler vs torch_fp16_scaler, bf16_params vs
torch_bf16_params.

Per iteration, CUDA events at four points (forward | backward | optimizer part), one synchronize at
the end of the iteration and none inside it, plus the host wall time (perf_counter) of the
optimizer part: what the Python side costs while the GPU still runs the backward. On the CPU the
four points are perf_counter readings. Each iteration starts on an idle GPU, so where the forward
is bound by kernel launches its time includes them: on an H100 the medians of identical llama_1b
forwards differed by up to 5 ms between pipelines, while the optimizer parts' p20-p80 stayed within
0.1 ms. Python's garbage collector is off during the iterations. Peak memory: max_memory_allocated
over the timed iterations (peak stats reset after warm-up); steady memory: memory_allocated after
the last iteration's zero_grad (params, optimizer state, kept gradients, the batches).

  python bench/bench_e2e.py --models llama_1b,gpt2_124m --iters 30 --warmup 5 --out $OUT
  python bench/bench_e2e.py --device cpu --models tiny --iters 2 --warmup 1 --out /tmp/e2e
"""
from __future__ import annotations

import argparse
import datetime
import gc
import importlib
import importlib.util
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_report  # noqa: E402
import bench_step  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LR, BETAS, WEIGHT_DECAY, MAX_GRAD_NORM = 3e-4, (0.9, 0.95), 0.1, 1.0
GB = 1e9


# ----------------------------------------------------------------------------------------------
# Models


@dataclass(frozen=True)
class Model:
    name: str
    config: Callable[[], object]   # -> a transformers config
    batch: int
    seq: int


def llama_1b_config():
    from transformers import LlamaConfig
    # TinyLlama-1.1B's shape (bench_step.llama_1b lists the same 201 tensors). use_cache=False: a
    # training forward has no use for the KV cache it would otherwise build.
    return LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                       num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                       max_position_embeddings=2048, use_cache=False)


def gpt2_124m_config():
    from transformers import GPT2Config
    return GPT2Config(use_cache=False)


def tiny_llama_config():
    from transformers import LlamaConfig
    return LlamaConfig(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=256, max_position_embeddings=128, use_cache=False)


def tiny_gpt2_config():
    from transformers import GPT2Config
    # bos/eos inside the byte vocabulary (GPT2Config's 50256 is not).
    return GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=128,
                      bos_token_id=255, eos_token_id=255, use_cache=False)


MODELS = {m.name: m for m in [
    Model("llama_1b", llama_1b_config, batch=4, seq=1024),
    Model("gpt2_124m", gpt2_124m_config, batch=8, seq=1024),
    Model("tiny_llama", tiny_llama_config, batch=2, seq=64),
    Model("tiny_gpt2", tiny_gpt2_config, batch=2, seq=64),
]}
MODEL_ALIASES = {"tiny": ["tiny_llama", "tiny_gpt2"]}


def build_model(model: Model, device: torch.device, seed: int) -> torch.nn.Module:
    """Random init on the device itself (the 1.1B init takes seconds on a GPU, minutes on the
    host), from one seed, so every pipeline starts from the same weights."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    with torch.device(device):
        net = AutoModelForCausalLM.from_config(model.config(), attn_implementation="sdpa")
    return net.train()


def make_batches(model: Model, vocab: int, count: int, device: torch.device, seed: int) -> torch.Tensor:
    """count batches of random token ids, one per iteration: the same for every pipeline."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return torch.randint(0, vocab, (count, model.batch, model.seq), generator=gen, device=device)


# ----------------------------------------------------------------------------------------------
# Pipelines: a builder takes the parameters and returns the backward and the optimizer part


@dataclass
class Training:
    backward: Callable[[torch.Tensor], None]
    optimizer_part: Callable[[], None]
    optimizer: str                                  # what was built, for the row
    scale: Callable[[], float] | None = None        # the loss scale now (syncs); scaler pipelines


def plain_backward(loss: torch.Tensor) -> None:
    loss.backward()


def torch_adamw(params):
    return torch.optim.AdamW(params, lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY, fused=True)


def build_torch_clip(params, device):
    opt = torch_adamw(params)

    def optimizer_part():
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return Training(plain_backward, optimizer_part, "clip_grad_norm_ + torch.optim.AdamW(fused=True)")


def build_torch_fp16_scaler(params, device):
    opt = torch_adamw(params)
    scaler = torch.amp.GradScaler(device.type)

    def optimizer_part():
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        scaler.step(opt)  # fused AdamW takes found_inf on the device: no host sync
        scaler.update()
        opt.zero_grad(set_to_none=True)

    return Training(lambda loss: scaler.scale(loss).backward(), optimizer_part,
                    "torch.amp.GradScaler + clip_grad_norm_ + torch.optim.AdamW(fused=True)",
                    scale=scaler.get_scale)


# The fusedopt pipelines' backend on CUDA: "auto" (Triton where installed, else the CUDA
# extension), or "triton" / "cuda" (--backend), set once by main().
BACKEND = "auto"


def fusedopt_backend(device: torch.device) -> str:
    # The kernel backends run CUDA tensors only; on the CPU the package's reference math runs.
    return BACKEND if device.type == "cuda" else "reference"


def resolved_backend(opt) -> str:
    """The kernel backend a fusedopt optimizer's tensors run on ('auto' resolved)."""
    return ",".join(sorted({ds.backend for ds in opt.engine.devices.values()}))


def fusedopt_builder(corrected: bool, stats: bool, scaled: bool):
    def build(params, device):
        import fusedopt
        cls = fusedopt.AdamC if corrected else fusedopt.AdamW
        opt = cls(params, lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY, max_grad_norm=MAX_GRAD_NORM,
                  backend=fusedopt_backend(device), stats=stats)
        what = (f"fusedopt.{cls.__name__}(max_grad_norm={MAX_GRAD_NORM}, stats={stats}, "
                f"backend={fusedopt_backend(device)!r}): {resolved_backend(opt)}")
        if not scaled:
            def optimizer_part():
                opt.step()
                opt.zero_grad(set_to_none=True)

            return Training(plain_backward, optimizer_part, what)
        scaler = fusedopt.GradScaler()

        def optimizer_part():
            scaler.step(opt)  # unscale, inf check, clip, update and the scale update, fused
            scaler.update()
            opt.zero_grad(set_to_none=True)

        return Training(lambda loss: scaler.scale(loss).backward(), optimizer_part,
                        "fusedopt.GradScaler + " + what, scale=scaler.get_scale)
    return build


@dataclass(frozen=True)
class Pipeline:
    name: str
    build: Callable[..., Training]
    autocast: torch.dtype | None       # forward under torch.autocast(dtype); None: no autocast
    bf16_params: bool = False          # model.to(torch.bfloat16) before the optimizer is built
    baseline: str | None = None        # the torch pipeline a fusedopt pipeline is compared with
    cuda_only: str | None = None       # why it does not run on the CPU


FP16_CUDA_ONLY = "fp16 autocast + loss scaling is a CUDA training setup; timed on CUDA only"

PIPELINES = {p.name: p for p in [
    Pipeline("torch_fused_clip", build_torch_clip, torch.bfloat16),
    Pipeline("torch_fp16_scaler", build_torch_fp16_scaler, torch.float16, cuda_only=FP16_CUDA_ONLY),
    Pipeline("fusedopt_adamw", fusedopt_builder(False, False, False), torch.bfloat16,
             baseline="torch_fused_clip"),
    Pipeline("fusedopt_adamc_stats", fusedopt_builder(True, True, False), torch.bfloat16,
             baseline="torch_fused_clip"),
    Pipeline("fusedopt_fp16_scaler", fusedopt_builder(False, False, True), torch.float16,
             baseline="torch_fp16_scaler", cuda_only=FP16_CUDA_ONLY),
    Pipeline("torch_bf16_params", build_torch_clip, None, bf16_params=True),
    Pipeline("fusedopt_bf16_params", fusedopt_builder(False, False, False), None, bf16_params=True,
             baseline="torch_bf16_params"),
]}

TIME_FIGURES = ("iter_ms", "fwd_ms", "bwd_ms", "opt_ms", "opt_host_ms")
MEMORY_FIGURES = ("peak_gb", "steady_gb", "peak_reserved_gb")


# ----------------------------------------------------------------------------------------------
# Timing


def mark(device: torch.device):
    """A point in time: a recorded CUDA event on the GPU (no sync), perf_counter on the CPU."""
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def ms_between(a, b) -> float:
    if isinstance(a, float):
        return (b - a) * 1e3
    return a.elapsed_time(b)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def spread(samples: list[float]) -> dict:
    return {"median": bench_report.percentile(samples, 50), "p20": bench_report.percentile(samples, 20),
            "p80": bench_report.percentile(samples, 80)}


def timed_iterations(iteration, batches, device, args, after_warmup=lambda: None):
    """args.warmup untimed iterations, then args.iters timed ones, the peak memory statistics
    reset in between. `iteration(batch)` returns (the four marks, host ms of the optimizer part,
    the loss). Returns the lists (marks, host_ms, losses) and what after_warmup() returned."""
    # Python's cyclic collector would pause at random points of random iterations (a full pass
    # over the heap of torch + transformers objects). Training loops turn it off and collect on
    # their own schedule (LLM Foundry's ScheduledGarbageCollector, OLMo's
    # GarbageCollectorCallback); here it is off for the iterations and run between pipelines.
    gc.collect()
    gc.disable()
    try:
        for i in range(args.warmup):
            iteration(batches[i])
        sync(device)
        warm = after_warmup()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        marks, host, losses = [], [], []
        for i in range(args.warmup, args.warmup + args.iters):
            points, host_ms, loss = iteration(batches[i])
            marks.append(points)
            host.append(host_ms)
            losses.append(loss)
        sync(device)
    finally:
        gc.enable()
    return marks, host, losses, warm


def iteration_figures(marks, host) -> dict:
    """Per figure (iter, fwd, bwd, opt GPU ms; opt host ms): the spread, and the samples."""
    figures = {
        "iter_ms": [ms_between(m[0], m[3]) for m in marks],
        "fwd_ms": [ms_between(m[0], m[1]) for m in marks],
        "bwd_ms": [ms_between(m[1], m[2]) for m in marks],
        "opt_ms": [ms_between(m[2], m[3]) for m in marks],
        "opt_host_ms": host,
    }
    out = {name: spread(samples) for name, samples in figures.items()}
    out["samples"] = {name: [round(x, 4) for x in samples] for name, samples in figures.items()}
    return out


def measure(model: Model, pipeline: Pipeline, device: torch.device, args) -> dict:
    """Build the model and the pipeline, warm up, time args.iters iterations. Returns the row's
    measured fields. Everything it allocates is local and goes when it returns or raises."""
    net = build_model(model, device, args.seed)
    if pipeline.bf16_params:
        net = net.to(torch.bfloat16)
    params = list(net.parameters())
    batches = make_batches(model, net.config.vocab_size, args.warmup + args.iters, device, args.seed)
    training = pipeline.build(params, device)
    probe = params[-1].detach().reshape(-1)[:4096].float().clone()

    def forward(tokens):
        if pipeline.autocast is None:
            return net(input_ids=tokens, labels=tokens).loss
        with torch.autocast(device.type, dtype=pipeline.autocast):
            return net(input_ids=tokens, labels=tokens).loss

    def iteration(tokens):
        t0 = mark(device)
        loss = forward(tokens)
        t1 = mark(device)
        training.backward(loss)
        t2 = mark(device)
        host0 = time.perf_counter()
        training.optimizer_part()
        host_ms = (time.perf_counter() - host0) * 1e3
        t3 = mark(device)
        # The one sync: the next iteration starts on an idle GPU, so its host timing does not
        # include waiting on a full launch queue left by this one.
        sync(device)
        return (t0, t1, t2, t3), host_ms, loss.detach()

    marks, host, losses, scale_before = timed_iterations(
        iteration, batches, device, args,
        after_warmup=lambda: training.scale() if training.scale else None)
    out = {"n_params": sum(p.numel() for p in params), "optimizer": training.optimizer,
           **iteration_figures(marks, host)}
    out["tokens_per_s"] = model.batch * model.seq / (out["iter_ms"]["median"] * 1e-3)
    if device.type == "cuda":
        out["peak_gb"] = torch.cuda.max_memory_allocated(device) / GB
        out["peak_reserved_gb"] = torch.cuda.max_memory_reserved(device) / GB
        out["steady_gb"] = torch.cuda.memory_allocated(device) / GB
    loss_values = torch.stack([x.float() for x in losses]).tolist()
    out["loss_first"], out["loss_last"] = loss_values[0], loss_values[-1]

    # invalid: the timings do not describe training (status error); warnings: they do, with a caveat.
    invalid, warnings = [], []
    if not all(math.isfinite(x) for x in loss_values):
        invalid.append("loss became non-finite")
    after = params[-1].detach().reshape(-1)[:4096].float()
    if torch.equal(after, probe):
        invalid.append("parameters did not change: the step did nothing")
    if training.scale is not None:
        scale_after = training.scale()
        # Growth needs 2000 clean steps (both scalers' default growth_interval), more than any run
        # here, so every halving of the scale in the timed window is one skipped step.
        skipped = round(math.log2(scale_before / scale_after))
        out["loss_scale"] = scale_after
        out["skipped_steps"] = skipped
        if skipped:
            warnings.append(f"{skipped} of {args.iters} timed steps skipped on inf/NaN gradients "
                            f"(scale {scale_before:g} -> {scale_after:g}): their optimizer part is cheaper")
    out["invalid"], out["warnings"] = invalid, warnings
    return out


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def first_line(e: BaseException) -> str:
    return (f"{type(e).__name__}: {e}".splitlines() or [type(e).__name__])[0][:400]


def new_row(model: Model, pipeline: Pipeline, status: str, note: str = "") -> dict:
    row = {"model": model.name, "pipeline": pipeline.name, "baseline": pipeline.baseline,
           "batch": model.batch, "seq": model.seq,
           "autocast": str(pipeline.autocast).replace("torch.", "") if pipeline.autocast else None,
           "param_dtype": "bfloat16" if pipeline.bf16_params else "float32",
           "status": status, "note": note, "n_params": None, "optimizer": None, "tokens_per_s": None}
    for name in TIME_FIGURES:
        row[name] = None
    for name in MEMORY_FIGURES:
        row[name] = None
    return row


def run_pipeline(model: Model, pipeline: Pipeline, device: torch.device, args) -> dict:
    row = new_row(model, pipeline, "ok")
    t0 = time.time()
    try:
        row.update(measure(model, pipeline, device, args))
        invalid, warnings = row.pop("invalid"), row.pop("warnings")
        row.update(status="error" if invalid else "ok", note="; ".join(invalid + warnings))
    except torch.OutOfMemoryError as e:
        row.update(status="oom", note=first_line(e))
    except Exception as e:  # one broken pipeline must not cost the others their rows
        row.update(status="error", note=first_line(e))
    # The exception and its traceback (which held the model) are gone here.
    free_memory(device)
    row["wall_s"] = round(time.time() - t0, 1)
    return row


def merge_rounds(rounds: list[dict]) -> dict:
    """One row from a pipeline's rounds (--rounds): the samples of its ok rounds pooled and their
    spreads taken again, each round's median kept (round_medians), the memory figures the
    largest of the rounds. A round that failed is named in the note."""
    ok = [r for r in rounds if r["status"] == "ok"]
    if not ok:
        return rounds[-1]
    row = dict(ok[0])
    samples = {name: [x for r in ok for x in r["samples"][name]] for name in ok[0]["samples"]}
    row.update({name: spread(values) for name, values in samples.items()})
    row["samples"] = samples
    row["round_medians"] = {name: [r[name]["median"] for r in ok] for name in samples}
    for name in MEMORY_FIGURES:
        values = [r[name] for r in ok if r[name] is not None]
        row[name] = max(values) if values else None
    row["tokens_per_s"] = row["batch"] * row["seq"] / (row["iter_ms"]["median"] * 1e-3)
    row["loss_last"] = ok[-1]["loss_last"]
    row["rounds"] = len(ok)
    row["wall_s"] = round(sum(r["wall_s"] for r in rounds if r.get("wall_s") is not None), 1)
    notes = [r["note"] for r in ok if r["note"]] + [
        f"round {i + 1}: {r['status']}: {r['note']}" for i, r in enumerate(rounds) if r["status"] != "ok"]
    row["note"] = "; ".join(dict.fromkeys(notes))
    return row


# ----------------------------------------------------------------------------------------------
# Comparisons and the report


def compare(rows: list[dict]) -> list[dict]:
    """For each fusedopt row with a measured torch counterpart of the same model, per figure:
    torch's and fusedopt's value (times: medians), fusedopt_minus_torch (<0: fusedopt saves) and
    torch_over_fusedopt (>1: fusedopt is that many times faster or smaller)."""
    ok = {(r["model"], r["pipeline"]): r for r in rows if r["status"] == "ok"}
    out = []
    for row in rows:
        base = ok.get((row["model"], row["baseline"]))
        if row["status"] != "ok" or base is None:
            continue
        figures = {}
        for name in TIME_FIGURES + MEMORY_FIGURES:
            t, f = base[name], row[name]
            if isinstance(t, dict):
                t, f = t["median"], f["median"]
            if t is None or f is None:
                continue
            figures[name] = {"torch": t, "fusedopt": f, "fusedopt_minus_torch": f - t,
                             "torch_over_fusedopt": t / f if f else None}
        out.append({"model": row["model"], "pipeline": row["pipeline"], "baseline": row["baseline"],
                    "figures": figures})
    return out


def _num(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _timed(fig: dict | None) -> str:
    if fig is None:
        return "-"
    return f"{fig['median']:.2f} ({fig['p20']:.2f}-{fig['p80']:.2f})"


HEADER_KEYS = ("device", "torch", "torch_cuda", "triton", "transformers", "fusedopt", "fusedopt_cuda_ext",
               "git_commit", "git_dirty", "date", "iters", "warmup", "rounds", "command")


def markdown(header: dict, rows: list[dict], comparisons: list[dict]) -> str:
    lines = [f"# {header['name']}", ""]
    lines += [f"- {key}: {header[key]}" for key in HEADER_KEYS if key in header]
    lines += [f"- note: {note}" for note in header["notes"]]
    lines += ["", "Times in ms: median (p20-p80) over the timed iterations. opt = everything after "
              "backward (unscale, clip, step, scaler update, zero_grad), GPU time; opt host = its "
              "host wall time. Memory in GB (1e9 bytes).", "",
              "| model | pipeline | status | iter ms | fwd ms | bwd ms | opt ms | opt host ms | tokens/s "
              "| peak GB | steady GB | loss first -> last | note |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        loss = (f"{r['loss_first']:.3f} -> {r['loss_last']:.3f}" if r.get("loss_first") is not None else "-")
        note = " / ".join(x for x in (r.get("optimizer"), r["note"]) if x)
        lines.append(f"| {r['model']} | {r['pipeline']} | {r['status']} | {_timed(r['iter_ms'])} "
                     f"| {_timed(r['fwd_ms'])} | {_timed(r['bwd_ms'])} | {_timed(r['opt_ms'])} "
                     f"| {_timed(r['opt_host_ms'])} | {_num(r['tokens_per_s'], '.0f')} "
                     f"| {_num(r['peak_gb'], '.2f')} | {_num(r['steady_gb'], '.2f')} | {loss} "
                     f"| {note.replace('|', '/')} |")
    lines += ["", "## fusedopt against its torch counterpart", "",
              "delta = fusedopt - torch (<0: fusedopt saves); x = torch / fusedopt (>1: fusedopt is "
              "faster or smaller). Times: medians.", "",
              "| model | pipeline | vs | iter delta ms | iter x | opt delta ms | opt x | opt host delta ms "
              "| opt host x | peak delta GB | peak x | steady delta GB | steady x |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in comparisons:
        cells = []
        for name, spec in (("iter_ms", ".2f"), ("opt_ms", ".2f"), ("opt_host_ms", ".2f"),
                           ("peak_gb", ".2f"), ("steady_gb", ".2f")):
            fig = c["figures"].get(name, {})
            cells += [_num(fig.get("fusedopt_minus_torch"), "+" + spec),
                      _num(fig.get("torch_over_fusedopt"), ".3f")]
        lines.append(f"| {c['model']} | {c['pipeline']} | {c['baseline']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write(out_dir: str, name: str, header: dict, rows: list[dict]) -> tuple[str, str]:
    """(Re)write <name>.json and <name>.md from all rows so far; called after every pipeline."""
    comparisons = compare(rows)
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, f"{name}.json")
    md_path = os.path.join(out_dir, f"{name}.md")
    texts = ((json_path, json.dumps({"header": header, "rows": rows, "comparisons": comparisons}, indent=1)),
             (md_path, markdown(header, rows, comparisons)))
    for path, text in texts:
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)  # a kill mid-write leaves the previous complete file
    return json_path, md_path


def fusedopt_import(module: str) -> str:
    """'ok' or why it does not import. For fusedopt._C, the CUDA extension: backend='auto' runs its
    kernels where it is built and Triton's where not."""
    try:
        importlib.import_module(module)
        return "ok"
    except Exception as e:  # any failure means the same here: that code will not run
        return f"not importable: {first_line(e)}"


def environment(device: torch.device, args) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = None
    try:
        import transformers
        transformers_version = transformers.__version__
    except Exception:
        transformers_version = None
    commit, dirty = bench_step.git_commit()
    header = {
        "name": args.name,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "torch_cuda": torch.version.cuda, "triton": triton_version,
        "transformers": transformers_version, "python": platform.python_version(),
        "fusedopt": fusedopt_import("fusedopt"), "fusedopt_cuda_ext": fusedopt_import("fusedopt._C"),
        "git_commit": commit, "git_dirty": dirty, "iters": args.iters, "warmup": args.warmup,
        "rounds": args.rounds,
        "seed": args.seed, "command": " ".join(sys.argv),
        "hyperparameters": {"lr": LR, "betas": BETAS, "weight_decay": WEIGHT_DECAY,
                            "max_grad_norm": MAX_GRAD_NORM},
        "notes": [
            "random init and random tokens from one seed; every pipeline builds a fresh model",
            "steady memory: after the last zero_grad, so parameters, optimizer state, any gradients "
            "an optimizer keeps, and the batches",
            "loss scalers at their defaults (init 2**16, growth every 2000 steps); skipped steps "
            "are counted in the note",
        ],
    }
    if device.type != "cuda":
        header["notes"].append("CPU: perf_counter at the four points, no memory figures")
    return header


# ----------------------------------------------------------------------------------------------
# Driver


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="llama_1b,gpt2_124m",
                    help=f"comma list of {sorted(MODELS)} or {sorted(MODEL_ALIASES)}")
    ap.add_argument("--pipelines", default="all", help=f"'all' or a comma list of {list(PIPELINES)}")
    ap.add_argument("--iters", type=int, default=30, help="timed iterations per pipeline")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run each model's pipelines this many times, every other round in "
                         "reverse order, and pool their iterations: a slow spell of the host or "
                         "the GPU then falls on every pipeline, not on one")
    ap.add_argument("--warmup", type=int, default=5,
                    help="untimed iterations first (kernel compiles, lazy state)")
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--out", default=None, help="results folder; default bench/results")
    ap.add_argument("--name", default=None, help="results file stem; default e2e_<device>")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backend", default="auto", choices=("auto", "triton", "cuda"),
                    help="the fusedopt pipelines' kernel backend on CUDA")
    ap.add_argument("--time-budget-s", type=float, default=0.0,
                    help="start no pipeline after this much wall time (0: no limit)")
    ap.add_argument("--pipeline-min-s", type=float, default=15.0,
                    help="start a pipeline only with at least this much budget left")
    args = ap.parse_args(argv)
    if args.iters < 1 or args.warmup < 0 or args.rounds < 1:
        ap.error("--iters and --rounds must be >= 1 and --warmup >= 0")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    models = []
    for name in (v for v in args.models.split(",") if v):
        if name not in MODELS and name not in MODEL_ALIASES:
            ap.error(f"--models: unknown {name!r}; choose from {sorted(MODELS)} or {sorted(MODEL_ALIASES)}")
        models += MODEL_ALIASES.get(name, [name])
    args.models = models
    args.pipelines = bench_report.comma_choices(ap, "--pipelines", args.pipelines, PIPELINES)
    return args


def default_name(device: torch.device) -> str:
    return bench_report.results_name("e2e", torch.cuda.get_device_name(device)
                                      if device.type == "cuda" else None)


def skipped(model: Model, pipeline: Pipeline, device: torch.device, args, start: float) -> dict | None:
    """A skipped row for a pipeline that does not run here (CPU) or now (time budget spent)."""
    left = args.time_budget_s - (time.time() - start) if args.time_budget_s else math.inf
    if device.type != "cuda" and pipeline.cuda_only:
        return new_row(model, pipeline, "skipped", pipeline.cuda_only)
    if left < args.pipeline_min_s:
        return new_row(model, pipeline, "skipped", f"time budget: {max(left, 0):.0f} s left")
    return None


def report(model: Model, pipeline: Pipeline, row: dict) -> None:
    if row["status"] == "ok":
        print(f"{model.name:>10s} {pipeline.name:21s} iter {_timed(row['iter_ms'])} ms, "
              f"opt {_timed(row['opt_ms'])} ms, host opt {row['opt_host_ms']['median']:.2f} ms, "
              f"peak {_num(row['peak_gb'], '.2f')} GB [{row['wall_s']:.0f} s] {row['note']}",
              flush=True)
    else:
        print(f"{model.name:>10s} {pipeline.name:21s} {row['status']}: {row['note']}", flush=True)


def main(argv=None) -> int:
    global BACKEND
    args = parse_args(argv)
    BACKEND = args.backend
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda asked for but torch sees no CUDA device", file=sys.stderr)
        return 2
    if importlib.util.find_spec("transformers") is None:
        print("bench_e2e needs transformers: pip install transformers", file=sys.stderr)
        return 2
    start = time.time()
    args.name = args.name or default_name(device)
    args.out = args.out or os.path.join(REPO, "bench", "results")
    header = environment(device, args)
    print(f"device {header['device']}, torch {header['torch']}, transformers {header['transformers']}, "
          f"fusedopt: {header['fusedopt']}, cuda ext: {header['fusedopt_cuda_ext']}", flush=True)
    rows: list[dict] = []
    for model_name in args.models:
        model = MODELS[model_name]
        pipelines = [PIPELINES[p] for p in args.pipelines]
        rounds: dict[str, list[dict]] = {p.name: [] for p in pipelines}
        first = len(rows)
        for round_index in range(args.rounds):
            for pipeline in pipelines if round_index % 2 == 0 else pipelines[::-1]:
                row = skipped(model, pipeline, device, args, start)
                if row is None:
                    # Written before it runs: a run killed at its time limit shows which
                    # pipeline it was in.
                    started = new_row(model, pipeline, "started", "did not finish (killed at a time limit?)")
                    write(args.out, args.name, header, rows + [started])
                    row = run_pipeline(model, pipeline, device, args)
                rounds[pipeline.name].append(row)
                rows[first:] = [merge_rounds(rounds[p.name]) for p in pipelines if rounds[p.name]]
                write(args.out, args.name, header, rows)
                report(model, pipeline, row)
    json_path, md_path = write(args.out, args.name, header, rows)
    print()
    print(markdown(header, rows, compare(rows)), end="")
    print(f"\nwrote {json_path} and {md_path} in {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
