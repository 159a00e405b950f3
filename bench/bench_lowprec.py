"""Issue 12's measures of fusedopt's low-precision tier against torch's AdamW and the peers.

The tier: bf16 params with master weights and compressed moments. The peers: FlashOptim, optimi.

Three parts, each a flag (none given: all three, in this order, the short ones first so that a
run cut by its time budget loses loss rows rather than whole parts):
  --step  one optimizer step at LLaMA-1.1B shapes in bf16 (bench_step's shapes, parameters,
          timing and copy baseline): ms, bytes per param by the formula below, GB/s, % of the
          copy bandwidth, and the resident optimizer state per param, measured
  --e2e   whole LLaMA-1B training iterations (bench_e2e's model, timing loop and memory figures):
          pure bf16 params (model.to(bfloat16)) against fp32 params + bf16 autocast
  --loss  the convergence comparison: a GPT-2-style byte-level model (85M params: d 768,
          12 layers, 12 heads, vocab 256, context 256; random init from the seed, no dropout)
          trained --steps steps (1500) on this repository's own text (*.py and *.md read from
          disk), batch --batch x 256, the same seed and the same batches for every row; lr 6e-4,
          linear warmup over 100 steps, cosine to 0 at the last step, betas (0.9, 0.95), weight
          decay 0.1 on every param, clip at global norm 1.0. bf16 rows cast the model with
          fusedopt.to_bf16 (norms kept in fp32). Per row: final loss (mean of the last 20 steps)
          and its difference to torch_fp32, the optimizer part's GPU time (CUDA events around
          clip + step + zero_grad), peak memory

Rows (--rows selects; each part runs those of its rows that are selected):
  torch_fp32               fp32 params + bf16 autocast; clip_grad_norm_ + torch AdamW(fused=True)
  fusedopt_fp32            fp32 params + bf16 autocast; fusedopt.AdamW(max_grad_norm=1.0)
  torch_bf16               bf16 params; clip_grad_norm_ + torch AdamW(fused=True) (bf16 moments)
  fusedopt_bf16_none_fp32  bf16 params; fusedopt.AdamW, no master weights, fp32 moments
  fusedopt_bf16_m32_fp32   master_weight_bits=32, state_dtype="fp32"
  fusedopt_bf16_m32_bf16   master_weight_bits=32, state_dtype="bf16"
  fusedopt_bf16_m24_int8   master_weight_bits=24, state_dtype="int8"
  fusedopt_bf16_m24_bf16   master_weight_bits=24, state_dtype="bf16"
  flashoptim_bf16          bf16 params; clip_grad_norm_ + flashoptim.FlashAdamW (24-bit master,
                           int8 moments: its defaults)
  optimi_bf16              bf16 params; clip_grad_norm_ + optimi.AdamW(kahan_sum=True)
A fusedopt mode the optimizer refuses with ValueError is recorded as "unavailable"; a peer that
does not import as "not installed".

Bytes per param of one step, the fewest a fused step must move through DRAM (bf16 params and
grads): the norm pass reads the grad (2 B); the update reads the grad (2), reads and writes the
param (2 + 2), reads and writes each of the two moments at its storage width (fp32 4, bf16 2,
int8 1 plus its group scales) and the master remainder or Kahan compensation (32-bit master 2,
24-bit 1, optimi's compensation 2). GB/s = n_params x (norm + update) / median time, for every
row, also where torch's clip moves more.

  python bench/bench_lowprec.py --out $OUT                      # all three parts on a GPU
  python bench/bench_lowprec.py --dry-run                       # tiny sizes on the CPU
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_e2e  # noqa: E402
import bench_report  # noqa: E402
import bench_step  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GB = 1e9
EPS = 1e-8


# ----------------------------------------------------------------------------------------------
# Rows


@dataclass(frozen=True)
class Row:
    name: str
    kind: str                        # "torch", "fusedopt", "flashoptim" or "optimi"
    bf16_params: bool
    what: str
    master_bits: int | None = None   # master_weight_bits (fusedopt's and FlashOptim's)
    state: str = "fp32"              # the moments' storage: fp32, bf16 or int8
    kahan: bool = False              # optimi: a bf16 Kahan compensation per param


ROWS = {r.name: r for r in [
    Row("torch_fp32", "torch", False,
        "fp32 params + bf16 autocast, clip_grad_norm_ + torch AdamW(fused=True)"),
    Row("fusedopt_fp32", "fusedopt", False,
        "fp32 params + bf16 autocast, fusedopt.AdamW(max_grad_norm=1.0)"),
    Row("torch_bf16", "torch", True,
        "bf16 params, clip_grad_norm_ + torch AdamW(fused=True), bf16 moments", state="bf16"),
    Row("fusedopt_bf16_none_fp32", "fusedopt", True,
        "bf16 params, fusedopt.AdamW, no master, fp32 moments"),
    Row("fusedopt_bf16_m32_fp32", "fusedopt", True,
        "bf16 params, fusedopt.AdamW, 32-bit master, fp32 moments", master_bits=32),
    Row("fusedopt_bf16_m32_bf16", "fusedopt", True,
        "bf16 params, fusedopt.AdamW, 32-bit master, bf16 moments", master_bits=32, state="bf16"),
    Row("fusedopt_bf16_m24_int8", "fusedopt", True,
        "bf16 params, fusedopt.AdamW, 24-bit master, int8 moments", master_bits=24, state="int8"),
    Row("fusedopt_bf16_m24_bf16", "fusedopt", True,
        "bf16 params, fusedopt.AdamW, 24-bit master, bf16 moments", master_bits=24, state="bf16"),
    Row("flashoptim_bf16", "flashoptim", True,
        "bf16 params, clip_grad_norm_ + FlashOptim FlashAdamW, 24-bit master, int8 moments",
        master_bits=24, state="int8"),
    Row("optimi_bf16", "optimi", True,
        "bf16 params, clip_grad_norm_ + optimi AdamW(kahan_sum=True), bf16 moments",
        state="bf16", kahan=True),
]}
LOSS_ROWS = list(ROWS)
# The step is timed at bf16 only: the fp32 step is bench_step.py's.
STEP_ROWS = ["torch_bf16", "fusedopt_bf16_none_fp32", "fusedopt_bf16_m32_fp32", "fusedopt_bf16_m32_bf16",
             "fusedopt_bf16_m24_bf16", "fusedopt_bf16_m24_int8", "flashoptim_bf16", "optimi_bf16"]
E2E_ROWS = ["torch_fp32", "torch_bf16", "fusedopt_bf16_m32_fp32", "fusedopt_bf16_m32_bf16",
            "fusedopt_bf16_m24_int8"]
E2E_BASELINES = ("torch_bf16", "torch_fp32")
PEER_PACKAGES = {"flashoptim": "flashoptim", "optimi": "torch-optimi"}

STATE_WIDTH = {"fp32": 4, "bf16": 2, "int8": 1}
REMAINDER_BYTES = {None: 0, 24: 1, 32: 2}
# int8 moments' group scales, bytes per element per moment: fusedopt keeps one exponent byte per
# group of 32 (fusedopt/engine/int8.py), FlashOptim one fp16 scale per group of 32.
INT8_SCALE_BYTES = {"fusedopt": 1 / 32, "flashoptim": 2 / 32}


def bytes_per_param(row: Row) -> tuple[float, float, float]:
    """(norm pass, update, resident state) bytes per param at bf16 params and grads (the module
    docstring's formula)."""
    state = STATE_WIDTH[row.state] + (INT8_SCALE_BYTES[row.kind] if row.state == "int8" else 0)
    remainder = 2 if row.kahan else REMAINDER_BYTES[row.master_bits]
    resident = 2 * state + remainder
    return 2, 2 + 4 + 2 * resident, resident


# The fusedopt rows' backend: bench_e2e's, which main() sets from --backend.
fusedopt_backend = bench_e2e.fusedopt_backend


def unavailable(row: Row, device: torch.device) -> tuple[str, str] | None:
    """(status, note) for a row that cannot run here, else None. A fusedopt mode is tried on a
    one-element param: the optimizer's ValueError names what it refuses."""
    if row.kind in PEER_PACKAGES:
        if importlib.util.find_spec(row.kind) is None:
            return "not installed", f"pip install {PEER_PACKAGES[row.kind]} (bench/README.md: wheels/)"
        if row.kind == "flashoptim" and device.type != "cuda":
            return "skipped", "FlashOptim's int8 moments and master bits need CUDA"
    if row.kind == "fusedopt":
        dtype = torch.bfloat16 if row.bf16_params else torch.float32
        try:
            import fusedopt
            fusedopt.AdamW([torch.nn.Parameter(torch.zeros(1, dtype=dtype, device=device))],
                           master_weight_bits=row.master_bits, state_dtype=row.state,
                           backend=fusedopt_backend(device))
        except (ImportError, ValueError) as e:
            return "unavailable", bench_e2e.first_line(e)
    return None


def build_optimizer(row: Row, params, device, hyper: dict, max_grad_norm: float):
    """(optimizer, step): step() is the row's whole optimizer step as training calls it, the
    global-norm clip included; zero_grad is left to the caller."""
    if row.kind == "fusedopt":
        import fusedopt
        opt = fusedopt.AdamW(params, **hyper, max_grad_norm=max_grad_norm,
                             backend=fusedopt_backend(device),
                             master_weight_bits=row.master_bits, state_dtype=row.state)
        return opt, opt.step
    if row.kind == "torch":
        opt = torch.optim.AdamW(params, **hyper, fused=True)
    elif row.kind == "flashoptim":
        import flashoptim
        # FlashOptim wants one dtype per param group (to_bf16 keeps the norms in fp32).
        dtypes = sorted({p.dtype for p in params}, key=str)
        groups = [{"params": [p for p in params if p.dtype == d]} for d in dtypes]
        opt = flashoptim.FlashAdamW(groups, **hyper, quantize=True, master_weight_bits=row.master_bits)
    else:
        import optimi
        opt = optimi.AdamW(params, **hyper, kahan_sum=True)

    def step():
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()

    return opt, step


def backend_of(opt) -> str | None:
    """The kernel backend a fusedopt optimizer resolved to; None for the others."""
    return bench_e2e.resolved_backend(opt) if hasattr(opt, "engine") else None


def free_memory(device: torch.device) -> None:
    bench_step.free_memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def guarded(measure, row: Row, device) -> dict:
    """measure() -> the row's fields, or the status and note of why it did not run or failed."""
    try:
        why = unavailable(row, device)
        if why:
            return {"status": why[0], "note": why[1]}
        return measure()
    except torch.OutOfMemoryError as e:
        return {"status": "oom", "note": bench_e2e.first_line(e)}
    except Exception as e:  # one broken row must not cost the others theirs
        return {"status": "error", "note": bench_e2e.first_line(e)}


# ----------------------------------------------------------------------------------------------
# --step: one optimizer step at LLaMA-1.1B shapes, bf16

STEP_HYPER = dict(lr=bench_step.LR, betas=bench_step.BETAS, eps=bench_step.EPS,
                  weight_decay=bench_step.WEIGHT_DECAY)


def measure_step(row: Row, shape: str, device, timing_args, copy_gbps) -> dict:
    shapes = bench_step.SHAPES[shape]()
    params = bench_step.make_params(shapes, torch.bfloat16, device, seed=timing_args.seed)
    n = sum(p.numel() for p in params)
    before = bench_step.probe_params(params)
    allocated = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    opt, step = build_optimizer(row, params, device, STEP_HYPER, bench_step.MAX_GRAD_NORM)
    step()  # torch's and the peers' state comes with the first step
    state_bytes = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        state_bytes = (torch.cuda.memory_allocated(device) - allocated) / n
    timing = bench_step.measure(step, device, timing_args)
    note = bench_step.check_moved(params, before)
    norm, update, _ = bytes_per_param(row)
    out = bench_step.make_row(shape, "bf16", row.name, len(shapes), n, round(n * (norm + update)),
                              status="error" if note else "ok", note=note, timing=timing,
                              copy_gbps=copy_gbps)
    out.update(state_bytes_per_param=state_bytes, backend=backend_of(opt))
    return out


def profile_main(args, device) -> int:
    """Under `ncu --profile-from-start off`: one step of each --rows step row at LLaMA-1.1B bf16
    shapes between cudaProfilerStart and Stop, after two unprofiled ones (Triton compiles,
    state is created), so the report holds the rows' own kernels only."""
    shapes = bench_step.SHAPES["llama_1b"]()
    for name in (r for r in STEP_ROWS if r in args.rows):
        row = ROWS[name]
        why = unavailable(row, device)
        if why:
            print(f"[profile] skip {name}: {why[1]}")
            continue
        params = bench_step.make_params(shapes, torch.bfloat16, device, seed=args.seed)
        opt, step = build_optimizer(row, params, device, STEP_HYPER, bench_step.MAX_GRAD_NORM)
        step()
        step()
        torch.cuda.synchronize(device)
        torch.cuda.profiler.start()
        step()
        torch.cuda.synchronize(device)
        torch.cuda.profiler.stop()
        print(f"[profile] {name}: 1 step profiled (backend {backend_of(opt)})", flush=True)
        del opt, step, params
        free_memory(device)
    return 0


def step_part(args, device, header, emit, left) -> None:
    # bench_step's defaults for bench_step.measure and measure_copy; a dry run takes its --dry-run's.
    dry = args.dry_run
    timing_args = argparse.Namespace(warmup=3, target_ms=20.0 if dry else 300.0, min_reps=3 if dry else 10,
                                     max_reps=5 if dry else 100, copy_mib=8 if dry else 1024, seed=args.seed)
    shape = "tiny" if dry else "llama_1b"
    copy = bench_step.measure_copy(device, timing_args)
    header["step"] = {"shape": shape, "copy_gbps": copy["gbps"], "hyperparameters": STEP_HYPER,
                      "max_grad_norm": bench_step.MAX_GRAD_NORM}
    shapes = bench_step.SHAPES[shape]()
    n = sum(bench_step.numel(s) for _, s in shapes)
    for name in (r for r in STEP_ROWS if r in args.rows):
        row = ROWS[name]
        norm, update, resident = bytes_per_param(row)
        base = bench_step.make_row(shape, "bf16", name, len(shapes), n, round(n * (norm + update)))
        t0 = time.time()
        if left() < args.row_min_s:
            fields = {"status": "skipped", "note": f"time budget: {max(left(), 0):.0f} s left"}
        else:
            fields = guarded(lambda: measure_step(row, shape, device, timing_args, copy["gbps"]), row, device)
        free_memory(device)
        emit("step", {**base, "what": row.what, "master_weight_bits": row.master_bits, "state": row.state,
                      "bytes_norm_per_param": norm, "bytes_update_per_param": update,
                      "state_bytes_per_param_formula": resident, "state_bytes_per_param": None,
                      "backend": None, **fields, "wall_s": round(time.time() - t0, 1)})


# ----------------------------------------------------------------------------------------------
# --e2e: LLaMA-1B training iterations through bench_e2e

E2E_HYPER = dict(lr=bench_e2e.LR, betas=bench_e2e.BETAS, eps=EPS, weight_decay=bench_e2e.WEIGHT_DECAY)


def e2e_pipeline(row: Row) -> bench_e2e.Pipeline:
    def build(params, device):
        opt, step = build_optimizer(row, params, device, E2E_HYPER, bench_e2e.MAX_GRAD_NORM)

        def optimizer_part():
            step()
            opt.zero_grad(set_to_none=True)

        return bench_e2e.Training(bench_e2e.plain_backward, optimizer_part, row.what)

    return bench_e2e.Pipeline(row.name, build, None if row.bf16_params else torch.bfloat16,
                              bf16_params=row.bf16_params,
                              baseline=None if row.kind == "torch" else "torch_bf16")


def e2e_versus(rows: list[dict]) -> list[dict]:
    """Each measured row against each measured baseline (E2E_BASELINES): iteration time ratio
    (baseline / row, >1: the row is faster), optimizer-part and peak-memory differences."""
    ok = {r["pipeline"]: r for r in rows if r["status"] == "ok"}
    out = []
    for name, row in ok.items():
        for base_name in E2E_BASELINES:
            base = ok.get(base_name)
            if base is None or base_name == name:
                continue
            peak = None if row["peak_gb"] is None else row["peak_gb"] - base["peak_gb"]
            out.append({"pipeline": name, "baseline": base_name,
                        "iter_x": base["iter_ms"]["median"] / row["iter_ms"]["median"],
                        "opt_ms_delta": row["opt_ms"]["median"] - base["opt_ms"]["median"],
                        "peak_gb_delta": peak})
    return out


def e2e_part(args, device, header, emit, left) -> None:
    model = bench_e2e.MODELS["tiny_llama" if args.dry_run else "llama_1b"]
    loop_args = argparse.Namespace(warmup=args.e2e_warmup, iters=args.e2e_iters, seed=args.seed)
    header["e2e"] = {"model": model.name, "batch": model.batch, "seq": model.seq, "iters": args.e2e_iters,
                     "warmup": args.e2e_warmup, "rounds": args.e2e_rounds, "hyperparameters": E2E_HYPER,
                     "max_grad_norm": bench_e2e.MAX_GRAD_NORM,
                     "bf16_params": "model.to(torch.bfloat16): norms in bf16 too"}
    names = [r for r in E2E_ROWS if r in args.rows]
    rounds = {name: [] for name in names}
    # Every other round in reverse order, each row's rounds pooled (bench_e2e --rounds).
    for round_index in range(args.e2e_rounds):
        for name in names if round_index % 2 == 0 else names[::-1]:
            row = ROWS[name]
            pipeline = e2e_pipeline(row)
            if left() < args.row_min_s:
                fields = {"status": "skipped", "note": f"time budget: {max(left(), 0):.0f} s left"}
            else:
                # run_pipeline returns the whole row (bench_e2e's format); the others only say why not.
                fields = guarded(lambda: bench_e2e.run_pipeline(model, pipeline, device, loop_args), row,
                                 device)
            free_memory(device)
            rounds[name].append({**bench_e2e.new_row(model, pipeline, "ok"), "what": row.what,
                                 "master_weight_bits": row.master_bits, "state": row.state, **fields})
            emit("e2e", bench_e2e.merge_rounds(rounds[name]))


# ----------------------------------------------------------------------------------------------
# --loss: the convergence comparison

LOSS_LR, LOSS_BETAS, LOSS_WD, LOSS_CLIP = 6e-4, (0.9, 0.95), 0.1, 1.0
LR_WARMUP = 100
FINAL_WINDOW = 20       # final loss: mean of the last 20 steps' losses
TIMING_SKIP = 10        # the first steps (Triton compiles, lazy state) are not timed
CURVE_STRIDE = 10       # the JSON keeps every 10th step's loss
# bench/results holds generated tables that change with every benchmark run; caches and
# build output are not text of the project.
CORPUS_SKIP = {"results", "__pycache__", "build", "dist"}


def default_corpus() -> list[str]:
    return [os.path.join(REPO, p) for p in ("README.md", "python", "tests", "bench", "docs", "examples")]


def gpt2_bytes_config():
    from transformers import GPT2Config
    # No dropout: every row then sees the same computation from the same batches, and its
    # random streams would differ between fp32 and bf16 models anyway.
    return GPT2Config(n_embd=768, n_layer=12, n_head=12, vocab_size=256, n_positions=256,
                      bos_token_id=255, eos_token_id=255, resid_pdrop=0.0, embd_pdrop=0.0,
                      attn_pdrop=0.0, use_cache=False)


def tiny_gpt2_bytes_config():
    from transformers import GPT2Config
    return GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64,
                      bos_token_id=255, eos_token_id=255, resid_pdrop=0.0, embd_pdrop=0.0,
                      attn_pdrop=0.0, use_cache=False)


def load_corpus(paths: list[str]) -> tuple[torch.Tensor, dict]:
    """The *.py and *.md files under paths (files or folders), in sorted walk order, concatenated
    as bytes: a uint8 tensor, and its size, file count and sha256 for the header (the text
    changes with the checkout, so results compare only at the same sha256)."""
    files = []
    for path in paths:
        if os.path.isfile(path):
            files.append(path)
            continue
        for root, dirs, names in os.walk(path):
            dirs[:] = sorted(d for d in dirs if d not in CORPUS_SKIP and not d.startswith("."))
            files += [os.path.join(root, n) for n in sorted(names) if n.endswith((".py", ".md"))]
    blob = b"".join(open(f, "rb").read() for f in files)
    info = {"paths": [os.path.relpath(p, REPO) for p in paths], "files": len(files), "bytes": len(blob),
            "sha256": hashlib.sha256(blob).hexdigest()}
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8), info


def lr_schedule(steps: int, peak: float, warmup: int) -> list[float]:
    """Linear warmup to peak over `warmup` steps, then cosine to 0 at the last step."""
    out = []
    for t in range(steps):
        if t < warmup:
            out.append(peak * (t + 1) / warmup)
        else:
            progress = (t - warmup) / max(1, steps - 1 - warmup)
            out.append(peak * 0.5 * (1 + math.cos(math.pi * progress)))
    return out


def train(row: Row, model: bench_e2e.Model, data, starts, schedule, skip: int, device, seed: int) -> dict:
    """Train one row; the optimizer part is timed from step `skip` on."""
    import fusedopt
    net = bench_e2e.build_model(model, device, seed)
    if row.bf16_params:
        fusedopt.to_bf16(net)
    params = list(net.parameters())
    opt, step = build_optimizer(row, params, device, dict(lr=LOSS_LR, betas=LOSS_BETAS, eps=EPS,
                                                          weight_decay=LOSS_WD), LOSS_CLIP)
    offsets = torch.arange(model.seq, device=device)
    losses = torch.empty(len(schedule), device=device)
    marks = []
    for t, lr in enumerate(schedule):
        for group in opt.param_groups:
            group["lr"] = lr
        tokens = data[starts[t, :, None] + offsets].long()
        t0 = bench_e2e.mark(device)
        with (contextlib.nullcontext() if row.bf16_params
              else torch.autocast(device.type, dtype=torch.bfloat16)):
            loss = net(input_ids=tokens, labels=tokens).loss
        loss.backward()
        t1 = bench_e2e.mark(device)
        step()
        opt.zero_grad(set_to_none=True)
        t2 = bench_e2e.mark(device)
        losses[t] = loss.detach()  # stays on the device: no sync inside the loop
        marks.append((t0, t1, t2))
    values = losses.tolist()  # the one sync
    timed = marks[skip:]
    final = values[-FINAL_WINDOW:]
    bad = next((t for t, x in enumerate(values) if not math.isfinite(x)), None)
    return {"status": "ok", "note": "" if bad is None else f"loss non-finite from step {bad}",
            "n_params": sum(p.numel() for p in params), "backend": backend_of(opt),
            "final_loss": sum(final) / len(final), "loss_first": values[0],
            "losses_every_10": [round(x, 4) for x in values[::CURVE_STRIDE]],
            "opt_ms": bench_e2e.spread([bench_e2e.ms_between(m[1], m[2]) for m in timed]),
            "iter_ms": bench_e2e.spread([bench_e2e.ms_between(m[0], m[2]) for m in timed]),
            "peak_gb": torch.cuda.max_memory_allocated(device) / GB if device.type == "cuda" else None}


def loss_part(args, device, header, emit, left) -> None:
    seq = 64 if args.dry_run else 256
    config = tiny_gpt2_bytes_config if args.dry_run else gpt2_bytes_config
    model = bench_e2e.Model("gpt2_bytes_tiny" if args.dry_run else "gpt2_bytes_85m", config, args.batch, seq)
    data, corpus = load_corpus(args.corpus)
    warmup = min(LR_WARMUP, args.steps // 10)
    skip = min(TIMING_SKIP, args.steps // 2)
    schedule = lr_schedule(args.steps, LOSS_LR, warmup)
    # The batches: window starts drawn once from the seed, the same for every row.
    gen = torch.Generator().manual_seed(args.seed)
    starts = torch.randint(0, data.numel() - seq, (args.steps, args.batch), generator=gen).to(device)
    data = data.to(device)
    corpus["epochs"] = args.steps * args.batch * seq / corpus["bytes"]
    header["loss"] = {"model": model.name, "steps": args.steps, "batch": args.batch, "seq": seq,
                      "lr": LOSS_LR, "lr_warmup": warmup,
                      "schedule": "linear warmup, cosine to 0 at the last step",
                      "betas": LOSS_BETAS, "eps": EPS, "weight_decay": LOSS_WD, "max_grad_norm": LOSS_CLIP,
                      "final_window": FINAL_WINDOW, "timing_skip": skip, "corpus": corpus,
                      "bf16_params": "fusedopt.to_bf16: LayerNorms kept in fp32"}
    longest = 0.0
    for name in (r for r in LOSS_ROWS if r in args.rows):
        row = ROWS[name]
        t0 = time.time()
        # A loss row takes about as long as the longest before it (rows that did not run take 0 s).
        if left() < max(args.row_min_s, longest):
            fields = {"status": "skipped", "note": f"time budget: {max(left(), 0):.0f} s left"}
        else:
            fields = guarded(lambda: train(row, model, data, starts, schedule, skip, device, args.seed),
                             row, device)
            longest = max(longest, time.time() - t0)
        free_memory(device)
        emit("loss", {"row": name, "what": row.what, "master_weight_bits": row.master_bits,
                      "state": row.state, "final_loss": None, "minus_torch_fp32": None, "opt_ms": None,
                      "iter_ms": None, "peak_gb": None, "backend": None, **fields,
                      "wall_s": round(time.time() - t0, 1)})


def add_loss_differences(rows: list[dict]) -> None:
    base = next((r for r in rows if r["row"] == "torch_fp32" and r["status"] == "ok"), None)
    for r in rows:
        r["minus_torch_fp32"] = (r["final_loss"] - base["final_loss"]
                                 if base is not None and r["status"] == "ok" else None)


# ----------------------------------------------------------------------------------------------
# Targets, report


def check_targets(results: dict) -> list[dict]:
    """Issue 12's measures, as bench_report.target_lines prints them; met None where a row it
    needs was not measured."""
    out = []

    def add(name, value, threshold, higher_is_better):
        met = None if value is None else (value >= threshold if higher_is_better else value <= threshold)
        out.append({"name": name, "value": value, "threshold": threshold, "met": met, "note": ""})

    loss = {r["row"]: r for r in results["loss"] if r["status"] == "ok"}
    for name in ("fusedopt_bf16_m32_fp32", "fusedopt_bf16_m24_int8", "fusedopt_bf16_m32_bf16"):
        diff = loss[name]["minus_torch_fp32"] if name in loss else None
        add(f"loss: |{name} - torch_fp32| final loss", None if diff is None else abs(diff), 0.01, False)
    step = {r["provider"]: r for r in results["step"] if r["status"] == "ok"}
    for name in (r for r in STEP_ROWS if ROWS[r].kind == "fusedopt"):
        add(f"step: {name} fraction of copy bandwidth",
            step[name]["frac_copy_bw"] if name in step else None, 0.90, True)
    int8 = step.get("fusedopt_bf16_m24_int8")
    add("step: fusedopt_bf16_m24_int8 ms", int8 and int8["ms_median"], 5.5, False)
    add("step: fusedopt_bf16_m24_int8 resident state B/param", int8 and int8["state_bytes_per_param"],
        3.2, False)
    return out


def _num(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _spread(fig) -> str:
    return "-" if fig is None else f"{fig['median']:.2f} ({fig['p20']:.2f}-{fig['p80']:.2f})"


def _note(r: dict) -> str:
    text = r["note"] if r["status"] == "ok" else f"{r['status']}: {r['note']}"
    return text.replace("|", "/")


HEADER_KEYS = ("device", "torch", "torch_cuda", "triton", "transformers", "fusedopt", "fusedopt_cuda_ext",
               "flashoptim", "optimi", "git_commit", "git_dirty", "date", "command")


def markdown(header: dict, results: dict, targets: list[dict]) -> str:
    lines = [f"# {header['name']}", ""] + [f"- {k}: {header[k]}" for k in HEADER_KEYS]
    lines += [f"- note: {note}" for note in header["notes"]]
    if "step" in header:
        s = header["step"]
        lines += ["", f"## Step: {s['shape']} shapes, bf16 params and grads", "",
                  f"Copy bandwidth {s['copy_gbps']:.0f} GB/s. ms: median (p20-p80) of both timed runs. "
                  "B/param: the formula (norm pass + update, module docstring). GB/s = n_params x "
                  "B/param / ms. State B/param: measured (memory_allocated after construction and "
                  "the first step minus before), formula in brackets.", "",
                  "| row | ms | run1 / run2 | B/param | GB/s | % copy BW | state B/param | backend | note |",
                  "|---|---:|---:|---:|---:|---:|---:|---|---|"]
        for r in results["step"]:
            ok = r["status"] == "ok"
            ms = f"{r['ms_median']:.3f} ({r['ms_p20']:.3f}-{r['ms_p80']:.3f})" if ok else "-"
            runs = f"{r['ms_run1']:.3f} / {r['ms_run2']:.3f}" if ok else "-"
            frac = None if r["frac_copy_bw"] is None else 100 * r["frac_copy_bw"]
            lines.append(f"| {r['provider']} | {ms} | {runs} "
                         f"| {r['bytes_norm_per_param']:g} + {r['bytes_update_per_param']:g} "
                         f"| {_num(r['gbps'], '.0f')} | {_num(frac, '.1f')} "
                         f"| {_num(r['state_bytes_per_param'], '.3f')} "
                         f"({r['state_bytes_per_param_formula']:.3f}) "
                         f"| {r['backend'] or '-'} | {_note(r)} |")
    if "e2e" in header:
        e = header["e2e"]
        versus = {(v["pipeline"], v["baseline"]): v for v in e2e_versus(results["e2e"])}
        lines += ["", f"## End to end: {e['model']}, batch {e['batch']} x {e['seq']}, "
                      f"{e['iters']} iterations", "",
                  "Times in ms: median (p20-p80). x: baseline iteration time / this row's (>1: faster). "
                  "Peak delta: this row's peak minus the baseline's, GB.", "",
                  "| row | iter ms | fwd ms | bwd ms | opt ms | peak GB | steady GB | x torch_bf16 "
                  "| x torch_fp32 | peak delta torch_bf16 | peak delta torch_fp32 | note |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in results["e2e"]:
            cells = []
            for key, spec in (("iter_x", ".3f"), ("peak_gb_delta", "+.2f")):
                cells += [_num(versus.get((r["pipeline"], b), {}).get(key), spec) for b in E2E_BASELINES]
            lines.append(f"| {r['pipeline']} | {_spread(r['iter_ms'])} | {_spread(r['fwd_ms'])} "
                         f"| {_spread(r['bwd_ms'])} | {_spread(r['opt_ms'])} | {_num(r['peak_gb'], '.2f')} "
                         f"| {_num(r['steady_gb'], '.2f')} | " + " | ".join(cells) + f" | {_note(r)} |")
    if "loss" in header:
        c = header["loss"]
        lines += ["", f"## Loss: {c['model']}, {c['steps']} steps, batch {c['batch']} x {c['seq']} bytes", "",
                  f"Corpus: {c['corpus']['files']} files, {c['corpus']['bytes']} bytes "
                  f"(sha256 {c['corpus']['sha256'][:12]}), {c['corpus']['epochs']:.2f} epochs. Final loss: "
                  f"mean of the last {c['final_window']} steps (nats per byte). opt ms: clip + step + "
                  f"zero_grad, GPU time, median (p20-p80) after the first {c['timing_skip']} steps.", "",
                  "| row | what | final loss | - torch_fp32 | opt ms | iter ms | peak GB | backend | note |",
                  "|---|---|---:|---:|---:|---:|---:|---|---|"]
        for r in results["loss"]:
            lines.append(f"| {r['row']} | {r['what']} | {_num(r['final_loss'], '.4f')} "
                         f"| {_num(r['minus_torch_fp32'], '+.4f')} | {_spread(r['opt_ms'])} "
                         f"| {_spread(r['iter_ms'])} | {_num(r['peak_gb'], '.2f')} | {r['backend'] or '-'} "
                         f"| {_note(r)} |")
    lines += ["", "## Targets (issue 12)", ""] + [f"- {t}" for t in bench_report.target_lines(targets)]
    return "\n".join(lines) + "\n"


def write(out_dir: str, name: str, header: dict, results: dict) -> tuple[str, str]:
    """(Re)write <name>.json and <name>.md from all rows so far; called after every row, so a run
    cut at its time limit keeps its rows."""
    add_loss_differences(results["loss"])
    targets = check_targets(results)
    os.makedirs(out_dir, exist_ok=True)
    json_path, md_path = (os.path.join(out_dir, f"{name}.{ext}") for ext in ("json", "md"))
    data = {"header": header, **results, "e2e_versus": e2e_versus(results["e2e"]), "targets": targets}
    texts = ((json_path, json.dumps(data, indent=1)), (md_path, markdown(header, results, targets)))
    for path, text in texts:
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)  # a kill mid-write leaves the previous complete file
    return json_path, md_path


def package_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment(device: torch.device, args) -> dict:
    commit, dirty = bench_step.git_commit()
    return {
        "name": args.name,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "torch_cuda": torch.version.cuda, "triton": package_version("triton"),
        "transformers": package_version("transformers"), "python": platform.python_version(),
        "fusedopt": bench_e2e.fusedopt_import("fusedopt"),
        "fusedopt_cuda_ext": bench_e2e.fusedopt_import("fusedopt._C"),
        "flashoptim": package_version("flashoptim"), "optimi": package_version("torch-optimi"),
        "git_commit": commit, "git_dirty": dirty, "command": " ".join(sys.argv), "seed": args.seed,
        "parts": args.parts, "rows": args.rows,
        "backend": args.backend,
        "notes": [f"fusedopt runs backend={args.backend!r} on CUDA ('auto': Triton where installed, "
                  "else the CUDA extension; each row names the one it got), 'reference' on the CPU",
                  "torch and the peers clip with clip_grad_norm_ before their step; fusedopt clips "
                  "inside it"],
    }


# ----------------------------------------------------------------------------------------------
# Driver

PARTS = {"step": step_part, "e2e": e2e_part, "loss": loss_part}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    for part in PARTS:
        ap.add_argument(f"--{part}", action="store_true", help=f"run the {part} part (none given: all)")
    ap.add_argument("--rows", default="all", help=f"'all' or a comma list of {list(ROWS)}")
    ap.add_argument("--steps", type=int, default=1500, help="--loss: training steps per row")
    ap.add_argument("--batch", type=int, default=16,
                    help="--loss: sequences of 256 bytes per step (16 keeps the suite inside its time; "
                         "32 roughly doubles the loss part)")
    ap.add_argument("--corpus", default=None,
                    help="--loss: comma list of files and folders whose *.py and *.md make the text "
                         "(default: README.md, python, tests, bench, docs, examples of this repo)")
    ap.add_argument("--e2e-iters", type=int, default=20, help="--e2e: timed iterations per row")
    ap.add_argument("--e2e-rounds", type=int, default=1,
                    help="--e2e: run the rows this many times, every other round in reverse order, "
                         "and pool each row's iterations")
    ap.add_argument("--e2e-warmup", type=int, default=3, help="--e2e: untimed iterations first")
    ap.add_argument("--dry-run", action="store_true",
                    help="tiny sizes on the CPU: a 2-layer GPT-2, 6 loss steps, tiny step shapes, "
                         "tiny_llama e2e; results under a temp folder")
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--out", default=None, help="results folder; default bench/results")
    ap.add_argument("--name", default=None, help="results file stem; default lowprec_<device>")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", action="store_true",
                    help="for ncu --profile-from-start off: one step of each step row in --rows, "
                         "between cudaProfilerStart/Stop; no results written")
    ap.add_argument("--backend", default="auto", choices=("auto", "triton", "cuda"),
                    help="the fusedopt rows' kernel backend on CUDA")
    ap.add_argument("--time-budget-s", type=float, default=0.0,
                    help="start no row after this much wall time (0: no limit)")
    ap.add_argument("--row-min-s", type=float, default=15.0,
                    help="start a row only with this much budget left (a loss row: at least the "
                         "longest loss row's time so far)")
    args = ap.parse_args(argv)
    args.parts = [p for p in PARTS if getattr(args, p)] or list(PARTS)
    args.rows = bench_report.comma_choices(ap, "--rows", args.rows, ROWS)
    if args.dry_run:
        args.device = args.device or "cpu"
        if args.steps == ap.get_default("steps"):
            args.steps = 6
        if args.batch == ap.get_default("batch"):
            args.batch = 2
        args.e2e_iters, args.e2e_warmup = min(args.e2e_iters, 2), min(args.e2e_warmup, 1)
        args.out = args.out or os.path.join(tempfile.gettempdir(), "fusedopt_lowprec_dry")
    if args.steps < 2 or args.batch < 1 or args.e2e_iters < 1 or args.e2e_rounds < 1 or args.e2e_warmup < 0:
        ap.error("--steps must be >= 2, --batch, --e2e-iters and --e2e-rounds >= 1, --e2e-warmup >= 0")
    args.corpus = [os.path.abspath(p) for p in args.corpus.split(",")] if args.corpus else default_corpus()
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    bench_e2e.BACKEND = args.backend
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda asked for but torch sees no CUDA device", file=sys.stderr)
        return 2
    if args.profile:
        if device.type != "cuda":
            print("--profile needs a CUDA device (it brackets steps with cudaProfilerStart/Stop)",
                  file=sys.stderr)
            return 2
        return profile_main(args, device)
    if {"loss", "e2e"} & set(args.parts) and importlib.util.find_spec("transformers") is None:
        print("--loss and --e2e build transformers models: pip install transformers", file=sys.stderr)
        return 2
    start = time.time()
    args.name = args.name or bench_report.results_name(
        "lowprec", torch.cuda.get_device_name(device) if device.type == "cuda" else None)
    args.out = args.out or os.path.join(REPO, "bench", "results")
    header = environment(device, args)
    results = {"step": [], "e2e": [], "loss": []}
    print(f"device {header['device']}, torch {header['torch']}, fusedopt: {header['fusedopt']}, "
          f"cuda ext: {header['fusedopt_cuda_ext']}, flashoptim {header['flashoptim']}, "
          f"optimi {header['optimi']}", flush=True)

    def left() -> float:
        return args.time_budget_s - (time.time() - start) if args.time_budget_s else math.inf

    def row_name(row: dict) -> str:
        return row.get("row") or row.get("provider") or row.get("pipeline")

    def emit(part: str, row: dict) -> None:
        """Add a row, or replace the part's row of the same name (a later round's pooled row)."""
        name = row_name(row)
        same = [i for i, r in enumerate(results[part]) if row_name(r) == name]
        if same:
            results[part][same[0]] = row
        else:
            results[part].append(row)
        write(args.out, args.name, header, results)
        summary = {"step": lambda: (f"{row['ms_median']:.3f} ms, "
                                    f"state {_num(row['state_bytes_per_param'], '.2f')} B/param"),
                   "e2e": lambda: f"iter {_spread(row['iter_ms'])} ms, peak {_num(row['peak_gb'], '.2f')} GB",
                   "loss": lambda: (f"final {row['final_loss']:.4f}, opt {_spread(row['opt_ms'])} ms, "
                                    f"peak {_num(row['peak_gb'], '.2f')} GB")}[part]
        text = summary() if row["status"] == "ok" else f"{row['status']}: {row['note']}"
        print(f"{part:>4s} {name:24s} {text} [{row.get('wall_s', 0):.0f} s]", flush=True)

    for part in args.parts:
        PARTS[part](args, device, header, emit, left)
    json_path, md_path = write(args.out, args.name, header, results)
    print()
    print(markdown(header, results, check_targets(results)), end="")
    print(f"\nwrote {json_path} and {md_path} in {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
