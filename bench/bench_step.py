"""One optimizer step over real model shapes: fusedopt's fused full step against torch's optimizers.

What is timed (one "step" per provider, gradients already in place, no forward/backward):
  torch_foreach      torch.optim.AdamW(foreach=True).step()
  torch_fused        torch.optim.AdamW(fused=True).step()
  torch_fused_graph  the same with capturable=True and a CUDA lr tensor, captured in a CUDA graph
  torch_compiled     the PyTorch recipe: AdamW(lr=torch.tensor(lr)) and
                     @torch.compile(fullgraph=False) around opt.step(); each (shape, dtype) compiles
                     and warms up in its own child process, all at once, then they time one at
                     a time; a compile that outlasts the time budget is killed, not waited for
  stock_pipeline     torch.amp.GradScaler.unscale_ + clip_grad_norm_(1.0) + AdamW(fused=True)
                     through scaler.step + scaler.update: the pipeline fusedopt replaces
  fusedopt_<b>       fusedopt.AdamC(max_grad_norm=1.0, backend=<b>) + fusedopt.GradScaler:
                     scaler.step(opt) + scaler.update() = unscale + inf check + clip + update +
                     scale update; <b> = triton or cuda; _stats with stats=True; _graph captured
  memcpy             dst.copy_(src) of --copy-mib MiB: the bandwidth ceiling the others are read against

Bytes: a full fused step must read g twice (the global norm has to be complete before any element
can be updated, so the update pass reads g again), read and write p, and read and write the fp32
moments m and v. Per real element (padding is never touched):
  fp32 params/grads:      g 4+4, p 4+4, m 4+4, v 4+4 = 32 B
  bf16/fp16 params/grads: g 2+2, p 2+2, m 4+4, v 4+4 = 24 B
Every row's GB/s uses this count, also for providers that do less (plain AdamW skips the norm pass;
torch keeps m and v in bf16 for bf16 params), so GB/s is "full-step-equivalent" and rows compare
as inverse times. The smallest set here moves about 2 GB per step, 40 times the H100's 50 MB L2, so
inputs are not rotated: each step streams from DRAM anyway.

Each provider is built on freshly generated parameters and gradients (same seed for all), warmed
up, then timed twice back to back (run1, run2: the spread), each step bracketed by CUDA events.
Only one provider's tensors live at a time (the 1.1B fp32 set needs 17.6 GB per provider), except
in the compile batch, whose children hold theirs together while the others compile or wait.

  python bench/bench_step.py --out-dir $OUT --name step_h100        # the full matrix on a GPU
  python bench/bench_step.py --dry-run                              # tiny shapes on the CPU
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_report  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Hyperparameters shared by every provider, so that all of them do the same arithmetic.
LR, BETAS, EPS, WEIGHT_DECAY, MAX_GRAD_NORM = 1e-3, (0.9, 0.999), 1e-8, 0.01, 1.0
# Both loss scalers start at 1 and never grow: torch's unscale_ divides the gradients in place on
# every step, so with the usual 2**16 they would reach zero within ~10 steps and we would time
# zeros. The scale's value does not change the work either scaler does.
SCALER_KW = dict(init_scale=1.0, growth_interval=1_000_000)
# Gradients ~ N(0, 1e-3): the global norm (e.g. ~33 at 1.1B) is above MAX_GRAD_NORM, so clipping
# is active, as it is early in real training.
GRAD_STD, PARAM_STD = 1e-3, 0.02

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------------------------
# Shapes


def gpt2_124m() -> list[tuple[str, tuple[int, ...]]]:
    """GPT-2 small as in HF GPT2LMHeadModel.parameters() (lm_head tied to wte): 148 tensors,
    124,439,808 params."""
    d, vocab, ctx, layers = 768, 50257, 1024, 12
    out = [("wte", (vocab, d)), ("wpe", (ctx, d))]
    for i in range(layers):
        h = f"h.{i}."
        out += [(h + "ln_1.weight", (d,)), (h + "ln_1.bias", (d,)),
                (h + "attn.c_attn.weight", (d, 3 * d)), (h + "attn.c_attn.bias", (3 * d,)),
                (h + "attn.c_proj.weight", (d, d)), (h + "attn.c_proj.bias", (d,)),
                (h + "ln_2.weight", (d,)), (h + "ln_2.bias", (d,)),
                (h + "mlp.c_fc.weight", (d, 4 * d)), (h + "mlp.c_fc.bias", (4 * d,)),
                (h + "mlp.c_proj.weight", (4 * d, d)), (h + "mlp.c_proj.bias", (d,))]
    return out + [("ln_f.weight", (d,)), ("ln_f.bias", (d,))]


def llama_1b() -> list[tuple[str, tuple[int, ...]]]:
    """TinyLlama-1.1B: d=2048, 22 layers, ffn 5632, vocab 32000, 4 KV heads of 64 (k/v 256x2048),
    RMSNorm weights only, untied lm_head: 201 tensors, 1,100,048,384 params."""
    d, vocab, layers, ffn, kv = 2048, 32000, 22, 5632, 256
    out = [("embed_tokens.weight", (vocab, d))]
    for i in range(layers):
        p = f"layers.{i}."
        out += [(p + "self_attn.q_proj.weight", (d, d)), (p + "self_attn.k_proj.weight", (kv, d)),
                (p + "self_attn.v_proj.weight", (kv, d)), (p + "self_attn.o_proj.weight", (d, d)),
                (p + "mlp.gate_proj.weight", (ffn, d)), (p + "mlp.up_proj.weight", (ffn, d)),
                (p + "mlp.down_proj.weight", (d, ffn)),
                (p + "input_layernorm.weight", (d,)), (p + "post_attention_layernorm.weight", (d,))]
    return out + [("norm.weight", (d,)), ("lm_head.weight", (vocab, d))]


def convnet_1200() -> list[tuple[str, tuple[int, ...]]]:
    """A ResNet-like bottleneck net, generated by rule (no randomness): a 7x7 stem conv 3->64 with
    BatchNorm, then 133 bottleneck blocks; a block of width w is conv1x1 4w->w, conv3x3 w->w,
    conv1x1 w->4w, each followed by a BatchNorm weight and bias. Stage widths 64/128/256/512 with
    47/46/30/10 blocks. 3 + 133*9 = 1200 tensors, 94,342,720 params; 800 of the tensors are BatchNorm
    vectors of 64-2048 elements: the many-small-tensors case."""
    out = [("stem.conv.weight", (64, 3, 7, 7)), ("stem.bn.weight", (64,)), ("stem.bn.bias", (64,))]
    for stage, (w, blocks) in enumerate(zip((64, 128, 256, 512), (47, 46, 30, 10))):
        for b in range(blocks):
            p = f"stage{stage}.block{b}."
            for j, (cout, cin, k) in enumerate(((w, 4 * w, 1), (w, w, 3), (4 * w, w, 1))):
                out += [(p + f"conv{j}.weight", (cout, cin, k, k)),
                        (p + f"bn{j}.weight", (cout,)), (p + f"bn{j}.bias", (cout,))]
    return out


def tiny() -> list[tuple[str, tuple[int, ...]]]:
    """For --dry-run on the CPU: sizes that do not divide a 4096 block, and a scalar-sized tensor."""
    return [("a", (33, 17)), ("b", (5,)), ("c", (128, 64)), ("d", (1,)), ("e", (4099,))]


SHAPES: dict[str, Callable[[], list[tuple[str, tuple[int, ...]]]]] = {
    "gpt2_124m": gpt2_124m, "llama_1b": llama_1b, "convnet_1200": convnet_1200, "tiny": tiny}


def numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def step_bytes(n_params: int, dtype: torch.dtype) -> int:
    """Fewest DRAM bytes of one full fused step (see the module docstring): g read twice, p read and
    written in the storage dtype, fp32 m and v read and written. fp32: 32 B/param; bf16: 24 B/param."""
    s = torch.empty((), dtype=dtype).element_size()
    moments = 2 * 4 + 2 * 4
    return n_params * (2 * s + 2 * s + moments)


def make_params(shapes, dtype: torch.dtype, device: torch.device, seed: int = 0) -> list[torch.nn.Parameter]:
    """Parameters ~ N(0, PARAM_STD) with .grad ~ N(0, GRAD_STD), generated on the device (fast even
    at 1.1B) from one seed, so every provider starts from the same values."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    params = []
    for _, shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
                               .mul_(PARAM_STD).to(dtype))
        p.grad = torch.randn(shape, generator=gen, device=device, dtype=torch.float32).mul_(GRAD_STD).to(dtype)
        params.append(p)
    return params


# ----------------------------------------------------------------------------------------------
# Providers: each builder takes the parameters (grads set) and returns the step callable


def _torch_adamw(params, **kw):
    return torch.optim.AdamW(params, lr=kw.pop("lr", LR), betas=BETAS, eps=EPS,
                             weight_decay=WEIGHT_DECAY, **kw)


def build_torch_foreach(params, device):
    opt = _torch_adamw(params, foreach=True)
    return opt.step


def build_torch_fused(params, device):
    opt = _torch_adamw(params, fused=True)
    return opt.step


def build_torch_fused_graph(params, device):
    opt = _torch_adamw(params, fused=True, capturable=True, lr=torch.tensor(LR, device=device))
    return opt.step


def build_torch_compiled(params, device):
    # The recipe of the PyTorch tutorial "Compiling the optimizer with torch.compile": lr as a
    # tensor so an lr schedule would not recompile; foreach left to its default.
    opt = _torch_adamw(params, lr=torch.tensor(LR))

    @torch.compile(fullgraph=False)
    def step():
        opt.step()

    return step


def uses_loss_scaling(params):
    """bf16 training runs without a loss scaler (bf16 has fp32's exponent range), and torch's
    unscale_ refuses bf16 gradients; fp32 and fp16 steps carry the scaler."""
    return params[0].dtype != torch.bfloat16


def build_stock_pipeline(params, device):
    opt = _torch_adamw(params, fused=True)
    if not uses_loss_scaling(params):
        def step():
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            opt.step()
        return step
    scaler = torch.amp.GradScaler(device.type, **SCALER_KW)
    scaler.scale(torch.ones((), device=device))  # as the loss would: creates the scale tensor

    def step():
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        scaler.step(opt)  # fused AdamW takes found_inf on the device: no host sync here
        scaler.update()

    return step


def _fusedopt_builder(backend: str, stats: bool):
    def build(params, device):
        import fusedopt
        opt = fusedopt.AdamC(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY,
                             max_grad_norm=MAX_GRAD_NORM, backend=backend, stats=stats)
        if not uses_loss_scaling(params):
            return opt.step
        scaler = fusedopt.GradScaler(**SCALER_KW)
        scaler.scale(torch.ones((), device=device))

        def step():
            scaler.step(opt)
            scaler.update()

        return step
    return build


@dataclass(frozen=True)
class Provider:
    name: str
    build: Callable
    graph: bool = False        # capture one step in a CUDA graph and time its replays
    needs_cuda: bool = False
    cpu_only: bool = False
    fusedopt_backend: str | None = None
    isolated: bool = False     # run in a child process with a time limit (torch.compile)


PROVIDERS = {p.name: p for p in [
    Provider("torch_foreach", build_torch_foreach),
    Provider("torch_fused", build_torch_fused),
    Provider("torch_fused_graph", build_torch_fused_graph, graph=True, needs_cuda=True),
    Provider("stock_pipeline", build_stock_pipeline),
    Provider("fusedopt_triton", _fusedopt_builder("triton", False), needs_cuda=True, fusedopt_backend="triton"),
    Provider("fusedopt_triton_stats", _fusedopt_builder("triton", True), needs_cuda=True, fusedopt_backend="triton"),
    Provider("fusedopt_triton_graph", _fusedopt_builder("triton", False), graph=True, needs_cuda=True,
             fusedopt_backend="triton"),
    Provider("fusedopt_cuda", _fusedopt_builder("cuda", False), needs_cuda=True, fusedopt_backend="cuda"),
    Provider("fusedopt_cuda_stats", _fusedopt_builder("cuda", True), needs_cuda=True, fusedopt_backend="cuda"),
    Provider("fusedopt_cuda_graph", _fusedopt_builder("cuda", False), graph=True, needs_cuda=True,
             fusedopt_backend="cuda"),
    # The CPU path of the package, so that --dry-run exercises the fusedopt calls end to end.
    Provider("fusedopt_reference", _fusedopt_builder("reference", False), cpu_only=True,
             fusedopt_backend="reference"),
    Provider("torch_compiled", build_torch_compiled, isolated=True),
]}


def fusedopt_status() -> dict:
    """Whether fusedopt imports and whether its CUDA extension is built: asked once, up front."""
    try:
        import fusedopt
    except Exception as e:  # any import failure means the same thing here: no fusedopt rows
        return {"fusedopt": f"not importable: {type(e).__name__}: {e}", "cuda_ext": "fusedopt not importable"}
    try:
        from fusedopt.engine import backends
        built = backends.available("cuda")
        why = "backends.available('cuda') is False"
    except Exception as e:  # the CUDA backend module itself may not exist yet
        built, why = False, f"{type(e).__name__}: {e}"
    ext = None if built else (f"fusedopt._C not built ({why}); build it with "
                              "`python3 -m pip install --no-build-isolation --no-deps -e .`")
    return {"fusedopt": None, "cuda_ext": ext, "version": getattr(fusedopt, "__version__", None)}


def unavailable(provider: Provider, device: torch.device, fstatus: dict) -> str | None:
    interpreted = (provider.fusedopt_backend == "triton" and not provider.graph
                   and os.environ.get("TRITON_INTERPRET") == "1")
    if provider.needs_cuda and device.type != "cuda" and not interpreted:
        return "needs CUDA"
    if provider.cpu_only and device.type != "cpu":
        return "CPU-only provider (per-tensor reference math)"
    if provider.fusedopt_backend is not None and fstatus["fusedopt"]:
        return "fusedopt " + fstatus["fusedopt"]
    if provider.fusedopt_backend == "cuda" and fstatus["cuda_ext"]:
        return fstatus["cuda_ext"]
    return None


# ----------------------------------------------------------------------------------------------
# Timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], None], reps: int, device: torch.device) -> list[float]:
    """Milliseconds of each of reps consecutive steps. On CUDA an event pair brackets each step, so
    a step that is bound by launch overhead is timed with its launch gaps, as in training."""
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for s, e in zip(starts, ends):
            s.record()
            step()
            e.record()
        torch.cuda.synchronize(device)
        return [s.elapsed_time(e) for s, e in zip(starts, ends)]
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def capture_graph(step: Callable[[], None]) -> tuple[Callable[[], None], object]:
    """Warm up on a side stream (lazy state creation must happen outside capture), then capture one
    step; returns the replay callable and the graph (kept alive by the caller)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay, graph


def measure(step, device, args, before_timing: Callable[[], None] | None = None) -> dict:
    """Warm up, estimate the step time, pick the repetition count for --target-ms per run (within
    --min-reps..--max-reps), and time two runs back to back. before_timing runs between warm-up
    and timing (a compile child waits there for its turn on the GPU)."""
    for _ in range(args.warmup):
        step()
    sync(device)
    if before_timing is not None:
        before_timing()
    est = sorted(time_steps(step, 3, device))[1]
    reps = max(args.min_reps, min(args.max_reps, math.ceil(args.target_ms / max(est, 1e-3))))
    run1 = time_steps(step, reps, device)
    run2 = time_steps(step, reps, device)
    return {"run1": run1, "run2": run2, "reps": reps}


def probe_params(params) -> list[torch.Tensor]:
    return [params[0].detach().reshape(-1)[:4096].float().clone(),
            params[-1].detach().reshape(-1)[:4096].float().clone()]


def check_moved(params, before) -> str:
    """A step that silently skipped (found_inf stuck at 1, a dead kernel) would look very fast:
    check that the parameters moved and stayed finite. Syncs, after timing only."""
    after = probe_params(params)
    if not all(torch.isfinite(a).all().item() for a in after):
        return "parameters became non-finite"
    if all(torch.equal(a, b) for a, b in zip(after, before)):
        return "parameters did not change: the step did nothing"
    return ""


def make_row(shape: str, dtype: str, provider: str, n_tensors: int, n_params: int, nbytes: int,
             status: str = "ok", note: str = "", timing: dict | None = None,
             copy_gbps: float | None = None) -> dict:
    row = {"shape": shape, "dtype": dtype, "provider": provider, "n_tensors": n_tensors,
           "n_params": n_params, "bytes_per_step": nbytes, "status": status, "note": note,
           "ms_median": None, "ms_p20": None, "ms_p80": None, "ms_run1": None, "ms_run2": None,
           "spread": None, "reps": None, "gbps": None, "frac_copy_bw": None, "speedup": {}}
    if timing is not None:
        both = timing["run1"] + timing["run2"]
        r1 = bench_report.percentile(timing["run1"], 50)
        r2 = bench_report.percentile(timing["run2"], 50)
        med = bench_report.percentile(both, 50)
        row.update(ms_median=med, ms_p20=bench_report.percentile(both, 20),
                   ms_p80=bench_report.percentile(both, 80), ms_run1=r1, ms_run2=r2,
                   spread=abs(r1 - r2) / min(r1, r2), reps=timing["reps"],
                   gbps=bench_report.gbps(nbytes, med))
        if copy_gbps:
            row["frac_copy_bw"] = row["gbps"] / copy_gbps
    return row


def row_base(shape: str, dtype: str, provider: str) -> dict:
    shapes = SHAPES[shape]()
    n_params = sum(numel(s) for _, s in shapes)
    return dict(shape=shape, dtype=dtype, provider=provider, n_tensors=len(shapes),
                n_params=n_params, nbytes=step_bytes(n_params, DTYPES[dtype]))


def skipped_row(shape: str, dtype: str, provider: str, reason: str) -> dict:
    return make_row(**row_base(shape, dtype, provider), status="skipped", note=reason)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def run_provider(provider: Provider, shape: str, dtype: str, device, args, copy_gbps,
                 before_timing: Callable[[], None] | None = None) -> dict:
    base = row_base(shape, dtype, provider.name)
    free_memory(device)  # a failed provider's tensors outlive its frame until its traceback goes
    params = make_params(SHAPES[shape](), DTYPES[dtype], device, seed=args.seed)
    before = probe_params(params)
    graph = None
    try:
        step = provider.build(params, device)
        if provider.graph:
            step, graph = capture_graph(step)
        timing = measure(step, device, args, before_timing)
        note = check_moved(params, before)
        return make_row(**base, status="ok" if not note else "error", note=note,
                        timing=timing, copy_gbps=copy_gbps)
    except Exception as e:  # one broken provider must not cost the rest of the run
        msg = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        return make_row(**base, status="error", note=msg)
    finally:
        del params, graph
        step = None
        if provider.name == "torch_compiled":
            torch._dynamo.reset()  # its caches hold the optimizer and so every tensor of it
        free_memory(device)


def run_compiled_batch(jobs, args, copy_gbps, left: Callable[[], float]) -> list[dict]:
    """torch.compile rows, each in a child process (own session, so its compile workers die with
    it). All children compile at once: compile is CPU work and the wall time becomes the slowest
    compile instead of the sum. Each child warms up, touches <dir>/ready and waits for <dir>/go.
    Only when every child is ready (or the budget says stop: the unready ones are killed, their GPU
    work would disturb the timing) do the ready ones time, one at a time, the others idle."""
    threads = max(1, (os.cpu_count() or 2) // max(1, len(jobs)))
    rows, children = [], []
    tmp = tempfile.mkdtemp(prefix="fusedopt_compile_")
    try:
        for i, (provider, shape, dtype) in enumerate(jobs):
            d = os.path.join(tmp, str(i))
            os.mkdir(d)
            cmd = [sys.executable, os.path.abspath(__file__), "--child-row", os.path.join(d, "row.json"),
                   "--child-sync", d, "--providers", provider.name, "--shapes", shape, "--dtypes", dtype,
                   "--device", args.device, "--seed", str(args.seed), "--warmup", str(args.warmup),
                   "--target-ms", str(args.target_ms), "--min-reps", str(args.min_reps),
                   "--max-reps", str(args.max_reps), "--copy-gbps", str(copy_gbps or 0)]
            log = open(os.path.join(d, "log"), "w")
            proc = subprocess.Popen(cmd, start_new_session=True, stdout=log, stderr=subprocess.STDOUT,
                                    env=dict(os.environ, TORCHINDUCTOR_COMPILE_THREADS=str(threads)))
            log.close()
            children.append((provider, shape, dtype, d, proc))
        t0 = time.time()

        def ready(d):
            return os.path.exists(os.path.join(d, "ready"))

        # Hold back ~10 s per child for its timing run and exit.
        while any(proc.poll() is None and not ready(d) for *_, d, proc in children):
            if left() < 10 * sum(ready(d) for *_, d, _ in children) + 15:
                break
            time.sleep(0.5)
        compile_s = time.time() - t0
        for provider, shape, dtype, d, proc in children:
            base = row_base(shape, dtype, provider.name)
            if proc.poll() is None and not ready(d):
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                rows.append(make_row(**base, status="skipped",
                                     note=f"compile not finished after {compile_s:.0f} s: time budget"))
                continue
            if ready(d):
                open(os.path.join(d, "go"), "w").close()
                try:
                    proc.wait(timeout=min(600.0, max(5.0, left() - 5)))
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            row_path = os.path.join(d, "row.json")
            if proc.returncode != 0 or not os.path.exists(row_path):
                with open(os.path.join(d, "log")) as f:
                    tail = " / ".join(f.read().strip().splitlines()[-3:])[:300]
                rows.append(make_row(**base, status="error", note=f"child exit {proc.returncode}: {tail}"))
                continue
            with open(row_path) as f:
                row = json.load(f)
            row["note"] = (row.get("note", "") + f" compiled in a child process (all compiles: {compile_s:.0f} s)").strip()
            rows.append(row)
    finally:
        for *_, proc in children:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def measure_copy(device, args) -> dict:
    """Device-to-device copy: the practical bandwidth ceiling. bytes = read + written."""
    n = args.copy_mib * 2**20 // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    try:
        timing = measure(lambda: dst.copy_(src), device, args)
    finally:
        del src, dst
        free_memory(device)
    row = make_row("copy", "fp32", "memcpy", 1, n, 2 * n * 4, timing=timing,
                   note=f"{args.copy_mib} MiB dst.copy_(src); bytes = read + written")
    row["frac_copy_bw"] = 1.0
    return row


# ----------------------------------------------------------------------------------------------
# Environment header


def _cmd_first_line(cmd: list[str], pattern: str = "") -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [ln.strip() for ln in out.splitlines() if re.search(pattern, ln)]
    return lines[0] if lines else None


def git_commit() -> tuple[str, bool | None]:
    """GIT_COMMIT from the environment wins: the GPU machine's copy of the tree may have no .git."""
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"], None
    try:
        sha = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha or "unknown"), (bool(dirty) if sha else None)
    except (OSError, subprocess.SubprocessError):
        return "unknown", None


def environment(device: torch.device, args, fstatus: dict) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = None
    commit, dirty = git_commit()
    header = {
        "name": args.name,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": "cpu", "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "triton": triton_version, "nvcc": _cmd_first_line(["nvcc", "--version"], "release"),
        "driver": _cmd_first_line(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], "."),
        "python": platform.python_version(), "fusedopt_version": fstatus.get("version"),
        "fusedopt_cuda_ext": "built" if not fstatus["cuda_ext"] else fstatus["cuda_ext"],
        "git_commit": commit, "git_dirty": dirty, "command": " ".join(sys.argv),
        "copy_gbps": None, "l2_bytes": None,
        "notes": [
            "GB/s = fewest bytes of a full fused step (fp32 32 B/param, bf16 24 B/param, real "
            "elements only) / median time, for every provider",
            "inputs not rotated: the smallest parameter set moves ~2 GB per step, far above L2",
            "each provider timed twice back to back (run1/run2), CUDA events around every step",
            "torch providers keep m and v in the parameter dtype (bf16 for bf16 params); fusedopt "
            "keeps them in fp32",
            f"loss scalers at scale 1 ({SCALER_KW}) so torch's in-place unscale_ keeps gradients nonzero",
        ],
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        header.update(device=props.name, sm_count=props.multi_processor_count,
                      total_memory_bytes=props.total_memory,
                      l2_bytes=getattr(props, "L2_cache_size", None))
    return header


# ----------------------------------------------------------------------------------------------
# Driver


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU smoke run: tiny shapes, few repetitions, results under a temp folder")
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--shapes", default="gpt2_124m,llama_1b,convnet_1200",
                    help=f"comma list of {sorted(SHAPES)}")
    ap.add_argument("--dtypes", default="fp32,bf16", help=f"comma list of {sorted(DTYPES)}")
    ap.add_argument("--providers", default="all", help=f"'all' or a comma list of {sorted(PROVIDERS)}")
    ap.add_argument("--out-dir", default=None, help="default bench/results (dry run: a temp folder)")
    ap.add_argument("--name", default=None, help="results file stem; default step_<device>")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps before timing (>=3: compile, lazy state)")
    ap.add_argument("--target-ms", type=float, default=300.0, help="time per timed run; sets the repetitions")
    ap.add_argument("--min-reps", type=int, default=10)
    ap.add_argument("--max-reps", type=int, default=100)
    ap.add_argument("--copy-mib", type=int, default=1024, help="size of the copy baseline's source")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time-budget-s", type=float, default=0.0,
                    help="stop starting providers when this much wall time is used (0: no limit)")
    ap.add_argument("--provider-min-s", type=float, default=15.0,
                    help="start an eager provider only with at least this much budget left")
    ap.add_argument("--compile-min-s", type=float, default=60.0,
                    help="start a torch_compiled child only with at least this much budget left")
    ap.add_argument("--profile", default=None,
                    help="ncu mode: build these providers (comma list) for the first shape/dtype, "
                         "warm up, run 2 steps between cudaProfilerStart/Stop; no timing")
    ap.add_argument("--child-row", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-sync", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--copy-gbps", type=float, default=0.0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.dry_run:
        args.device = args.device or "cpu"
        if args.shapes == ap.get_default("shapes"):
            args.shapes = "tiny"
        args.target_ms, args.min_reps, args.max_reps = min(args.target_ms, 20.0), 3, 5
        args.copy_mib = min(args.copy_mib, 8)
        args.out_dir = args.out_dir or os.path.join(tempfile.gettempdir(), "fusedopt_bench_dry")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    for key, table in (("shapes", SHAPES), ("dtypes", DTYPES)):
        values = [v for v in getattr(args, key).split(",") if v]
        bad = [v for v in values if v not in table]
        if bad:
            ap.error(f"--{key}: unknown {bad}; choose from {sorted(table)}")
        setattr(args, key, values)
    args.explicit_providers = args.providers != "all"
    args.providers = bench_report.comma_choices(ap, "--providers", args.providers, PROVIDERS)
    return args


def default_name(device: torch.device) -> str:
    return bench_report.results_name("step", torch.cuda.get_device_name(device)
                                      if device.type == "cuda" else None)


def child_main(args, device) -> int:
    """One provider, one shape, one dtype; the row goes to --child-row as JSON."""
    provider = PROVIDERS[args.providers[0]]

    def wait_for_turn():
        if args.child_sync:
            open(os.path.join(args.child_sync, "ready"), "w").close()
            while not os.path.exists(os.path.join(args.child_sync, "go")):
                time.sleep(0.05)

    row = run_provider(provider, args.shapes[0], args.dtypes[0], device, args, args.copy_gbps or None,
                       before_timing=wait_for_turn)
    with open(args.child_row, "w") as f:
        json.dump(row, f)
    return 0


def profile_main(args, device) -> int:
    """Under `ncu --profile-from-start off`: only the 2 steps between cudaProfilerStart and Stop
    are profiled, so warm-up, Triton compilation and setup stay out of the report."""
    shapes = SHAPES[args.shapes[0]]()
    fstatus = fusedopt_status()
    for name in args.profile.split(","):
        provider = PROVIDERS[name]
        reason = unavailable(provider, device, fstatus)
        if reason:
            print(f"[profile] skip {name}: {reason}")
            continue
        params = make_params(shapes, DTYPES[args.dtypes[0]], device, seed=args.seed)
        try:
            step = provider.build(params, device)
            for _ in range(args.warmup):
                step()
            sync(device)
            torch.cuda.profiler.start()
            for _ in range(2):
                step()
            sync(device)
            torch.cuda.profiler.stop()
            print(f"[profile] {name} {args.shapes[0]} {args.dtypes[0]}: 2 steps profiled")
        except Exception as e:  # report and go on to the next provider
            print(f"[profile] {name} failed: {type(e).__name__}: {e}")
        finally:
            del params
            step = None
            free_memory(device)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda asked for but torch sees no CUDA device", file=sys.stderr)
        return 2
    if args.child_row:
        return child_main(args, device)
    if args.profile:
        if device.type != "cuda":
            print("--profile needs a CUDA device (it brackets steps with cudaProfilerStart/Stop)", file=sys.stderr)
            return 2
        return profile_main(args, device)
    start = time.time()
    args.name = args.name or default_name(device)
    args.out_dir = args.out_dir or os.path.join(REPO, "bench", "results")
    fstatus = fusedopt_status()
    header = environment(device, args, fstatus)
    rows: list[dict] = []

    def emit(row, t0=None):
        if t0 is not None:
            row["wall_s"] = round(time.time() - t0, 1)  # setup + warm-up + timing: for budgeting
        rows.append(row)
        bench_report.write(args.out_dir, args.name, header, rows)
        if row["status"] == "ok":
            print(f"{row['shape']:>13s} {row['dtype']:4s} {row['provider']:22s} {row['ms_median']:9.3f} ms "
                  f"(p20 {row['ms_p20']:.3f}, p80 {row['ms_p80']:.3f}; runs {row['ms_run1']:.3f} / "
                  f"{row['ms_run2']:.3f}) {row['gbps']:7.0f} GB/s [{row.get('wall_s', 0):.0f} s] {row['note']}",
                  flush=True)
        else:
            print(f"{row['shape']:>13s} {row['dtype']:4s} {row['provider']:22s} {row['status']}: {row['note']}",
                  flush=True)

    def left() -> float:
        return args.time_budget_s - (time.time() - start) if args.time_budget_s else float("inf")

    print(f"device {header['device']}, torch {header['torch']}, triton {header['triton']}, "
          f"fusedopt: {fstatus['fusedopt'] or 'ok'}, cuda ext: {header['fusedopt_cuda_ext']}", flush=True)
    copy_row = measure_copy(device, args)
    header["copy_gbps"] = copy_row["gbps"]
    emit(copy_row)

    combos = [(dtype, shape) for dtype in args.dtypes for shape in args.shapes]  # fp32 (targets) first
    fast = [PROVIDERS[p] for p in args.providers if not PROVIDERS[p].isolated]
    isolated = [PROVIDERS[p] for p in args.providers if PROVIDERS[p].isolated]
    for dtype, shape in combos:
        for provider in fast:
            reason = unavailable(provider, device, fstatus)
            if reason is None and left() < args.provider_min_s:
                reason = "time budget used up"
            if reason:
                emit(skipped_row(shape, dtype, provider.name, reason))
                continue
            t0 = time.time()
            emit(run_provider(provider, shape, dtype, device, args, header["copy_gbps"]), t0)
    # Compiled providers last, as one batch (run_compiled_batch): their compile time is the least
    # predictable part of the run.
    jobs = []
    for dtype, shape in combos:
        for provider in isolated:
            reason = unavailable(provider, device, fstatus)
            if reason is None and left() < args.compile_min_s:
                reason = f"time budget: under {args.compile_min_s:.0f} s left for compiling"
            if reason is None and device.type == "cpu" and not args.explicit_providers:
                reason = "skipped on the CPU unless named in --providers (inductor's C++ compile is slow)"
            if reason:
                emit(skipped_row(shape, dtype, provider.name, reason))
            else:
                jobs.append((provider, shape, dtype))
    if jobs:
        t0 = time.time()
        for row in run_compiled_batch(jobs, args, header["copy_gbps"], left):
            emit(row, t0)

    json_path, md_path = bench_report.write(args.out_dir, args.name, header, rows)
    print()
    print(bench_report.markdown(header, rows, bench_report.check_targets(rows)), end="")
    print(f"\nwrote {json_path} and {md_path} in {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
