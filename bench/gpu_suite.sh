#!/usr/bin/env bash
# fusedopt GPU suite: the one command for the GPU machine, run from the repository root.
#
#   GIT_COMMIT=<sha> bash bench/gpu_suite.sh              # the device tool sets OUT
#   GIT_COMMIT=<sha> NCU=1 SKIP_TESTS=1 bash bench/gpu_suite.sh
#
# Steps, each time-boxed so that the whole suite ends inside SUITE_BUDGET_S (default 500 s; the
# device allows 600 s per command and kills the pipeline at the limit):
#   1. versions: nvidia-smi, python/torch/triton, nvcc, ncu, cmake, ninja        -> suite.log
#   2. build fusedopt._C in place without network (pip install -e .); on failure
#      install the Python package alone and go on with the Triton backend          -> build_tests.log
#   3. GPU tests: pytest -x -m "gpu or not slow" tests/                              -> build_tests.log
#   4. pytest-benchmark microbenchmarks, bench/test_bench_step.py                    -> microbench.json
#   5. the end-to-end benchmark, bench/bench_e2e.py: whole training iterations of
#      llama_1b and gpt2_124m, torch vs fusedopt pipelines (writes after every
#      pipeline)                                                                      -> e2e_<device>.json, .md
#   6. LOWPREC=1 only: the low-precision tier (issue 12), bench/bench_lowprec.py: isolated
#      bf16 step at 1.1B, LLaMA-1B pure-bf16 iterations, the 1500-step loss comparison; the
#      peers' wheels in wheels/ (if carried) are installed first                      -> lowprec_<device>.json, .md
#   7. the step benchmark, bench/bench_step.py (writes after every row, so a cut
#      leaves the rows so far)                                                        -> <name>.json, .md
#   8. FSDP=1 only (a machine of 2+ GPUs): bench/bench_fsdp.py under torchrun at each world
#      size of FSDP_WORLDS (default "1 2", up to the GPU count): LLaMA-1B under FSDP2  -> fsdp_<N>gpu.json, .md
#   9. NCU=1 only: Nsight Compute DRAM bytes and % of peak of every kernel of two
#      fused steps (Triton, then CUDA), llama_1b fp32                                -> ncu.txt
# Eight files at most come back in $OUT, as many as the device returns: hence one log for the
# build and the tests (their tails are in suite.log too).
#
# Knobs (environment): SUITE_BUDGET_S, BUILD_CAP_S, STEP_FLOOR_S / E2E_FLOOR_S / LOWPREC_FLOOR_S
# (the time held back for a later step, lowered when that step runs fewer rows), TESTS_CAP_S,
# MICRO_CAP_S, E2E_CAP_S, NCU_CAP_S,
# SKIP_BUILD=1 (no CUDA build; installs the Python package only if needed), SKIP_TESTS=1,
# TEST_PATHS (test files or folders, default tests/), SKIP_MICRO=1,
# SKIP_E2E=1, SKIP_STEP=1, LOWPREC=1, LOWPREC_CAP_S, LOWPREC_ARGS (extra bench_lowprec.py arguments,
# e.g. "--loss --rows torch_fp32,fusedopt_bf16_m32_fp32"), FSDP=1, FSDP_WORLDS, FSDP_CAP_S, FSDP_ARGS, E2E_ARGS (extra bench_e2e.py arguments, e.g. "--models gpt2_124m"), NCU=1, NCU_SHAPE,
# NAME (results stem),
# BENCH_ARGS (extra bench_step.py arguments, e.g. "--shapes llama_1b --dtypes fp32"),
# GIT_COMMIT (recorded in the results; the device's copy of the tree has no .git).
set -u -o pipefail
: "${OUT:?set OUT to the folder the results go to}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.." || exit 1
export PYTHONUNBUFFERED=1

BUDGET=${SUITE_BUDGET_S:-500}
# Least time each later step needs, held back from the earlier ones (seconds).
BENCH_FLOOR=${STEP_FLOOR_S:-180}
STEP_RESERVE=0
[[ -z ${SKIP_STEP:-} ]] && STEP_RESERVE=$BENCH_FLOOR
# The e2e step's floor: on an H100 (fusedopt on Triton) all 14 rows took 75 s including ~10 s of
# imports; the first row 16 s (CUDA and cuBLAS start-up), llama_1b rows 3-8 s, gpt2_124m 2-4 s.
# Each row records its wall_s.
E2E_FLOOR=${E2E_FLOOR_S:-90}
E2E_RESERVE=0
[[ -z ${SKIP_E2E:-} ]] && E2E_RESERVE=$E2E_FLOOR
# The low-precision step's floor: with its defaults it needs ~5.5 min (estimate, see
# bench/README.md), so it fits only with the other benchmarks skipped and SUITE_BUDGET_S raised.
LOWPREC_FLOOR=${LOWPREC_FLOOR_S:-300}
LOWPREC_RESERVE=0
[[ -n ${LOWPREC:-} ]] && LOWPREC_RESERVE=$LOWPREC_FLOOR
NCU_RESERVE=0
[[ -n ${NCU:-} ]] && NCU_RESERVE=${NCU_CAP_S:-120}
LOG="$OUT/build_tests.log"

source bench/suite_time.sh
# timeout 0 would mean no limit at all: a step whose cap came out 0 does not run.
no_time() { (($1 > 0)) && return 1; say "$2 skipped: no time left in the ${BUDGET}s budget"; }

versions() {
    say "versions"
    nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw,power.limit --format=csv || echo "nvidia-smi failed"
    python3 - <<'EOF'
import platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda})")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device {p.name}: {p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB, "
          f"L2 {getattr(p, 'L2_cache_size', 0) / 2**20:.0f} MiB")
else:
    print("torch sees no CUDA device")
try:
    import triton
    print(f"triton {triton.__version__}")
except ImportError as e:
    print(f"triton missing: {e}")
EOF
    nvcc --version 2>&1 | grep -i release || echo "nvcc missing"
    ncu --version 2>&1 | tail -n 1 || echo "ncu missing"
    cmake --version 2>&1 | head -n 1
    echo "ninja $(ninja --version 2>&1)"
    echo "git commit: ${GIT_COMMIT:-unknown (set GIT_COMMIT)}"
}

cuda_backend_built() {
    python3 -c "import sys; from fusedopt.engine import backends; sys.exit(0 if backends.available('cuda') else 1)" 2>/dev/null
}

ensure_importable() {
    python3 -c "import fusedopt.triton_kernels" 2>/dev/null && return
    echo "fusedopt not importable: installing the Python package alone (FUSEDOPT_SKIP_CUDA_BUILD=1)"
    FUSEDOPT_SKIP_CUDA_BUILD=1 timeout -k 10 120 \
        python3 -m pip install --no-build-isolation --no-deps --no-index -e . >>"$LOG" 2>&1
    python3 -c "import fusedopt.triton_kernels" || echo "fusedopt still not importable: its rows will be skipped"
}

build() {
    local t
    t=$(cap "${BUILD_CAP_S:-240}" $((STEP_RESERVE + E2E_RESERVE + LOWPREC_RESERVE + NCU_RESERVE + 60)))
    no_time "$t" "build" && return
    say "build fusedopt (CUDA extension for sm_${FUSEDOPT_CUDA_ARCHS:-90}), limit ${t}s"
    # sm_90 only: the H100 needs no other architecture, and one target halves the nvcc time.
    echo "=== build" >>"$LOG"
    FUSEDOPT_CUDA_ARCHS=${FUSEDOPT_CUDA_ARCHS:-90} MAX_JOBS=${MAX_JOBS:-16} \
        timeout -k 10 "$t" python3 -m pip install --no-build-isolation --no-deps --no-index -e . \
        >>"$LOG" 2>&1
    local rc=$?
    tail -n 12 "$LOG"
    if cuda_backend_built; then
        echo "CUDA backend: built (pip exit $rc)"
        return
    fi
    echo "CUDA backend: NOT available (pip exit $rc, see build_tests.log); continuing with the Triton backend"
    ensure_importable
}

gpu_tests() {
    local t
    t=$(cap "${TESTS_CAP_S:-240}" $((STEP_RESERVE + E2E_RESERVE + LOWPREC_RESERVE + NCU_RESERVE)))
    no_time "$t" "tests" && return
    say "tests: pytest -m 'gpu or not slow' ${TEST_PATHS:-tests/}, limit ${t}s"
    # SIGINT at the limit: pytest then reports the test it was in and the summary so far. No -x:
    # one failure must not hide the results of the tests after it (one call is all a session
    # may get).
    echo "=== tests" >>"$LOG"
    # shellcheck disable=SC2086  # TEST_PATHS is a list of paths
    timeout -s INT -k 15 "$t" python3 -m pytest -q -p no:cacheprovider -m "gpu or not slow" \
        --durations=15 ${TEST_PATHS:-tests/} >>"$LOG" 2>&1
    local rc=$?
    tail -n 25 "$LOG"
    ((rc == 124 || rc == 137 || rc == 2)) && echo "tests: exit $rc; 124/137/2 can mean cut at the ${t}s limit"
    echo "tests: exit $rc"
}

microbench() {
    local t
    t=$(cap "${MICRO_CAP_S:-60}" $((STEP_RESERVE + E2E_RESERVE + LOWPREC_RESERVE + NCU_RESERVE)))
    no_time "$t" "microbenchmarks" && return
    say "pytest-benchmark microbenchmarks, limit ${t}s"
    timeout -k 10 "$t" python3 -m pytest -q -p no:cacheprovider bench/test_bench_step.py \
        --benchmark-json="$OUT/microbench.json" --benchmark-columns=min,median,max,rounds \
        --benchmark-sort=name 2>&1 | tail -n 30
    echo "microbenchmarks: exit ${PIPESTATUS[0]}"
}

e2e_bench() {
    local t budget
    t=$(cap "${E2E_CAP_S:-240}" $((STEP_RESERVE + LOWPREC_RESERVE + NCU_RESERVE)))
    no_time "$t" "e2e benchmark" && return
    # As in step_bench: stop starting pipelines 15 s before the hard limit.
    budget=$((t > 20 ? t - 15 : 5))
    say "e2e benchmark: training iterations of llama_1b and gpt2_124m, limit ${t}s"
    # Results stem e2e_<device> (bench_e2e.py's default name).
    # shellcheck disable=SC2086  # E2E_ARGS is a list of arguments
    timeout -k 10 "$t" python3 bench/bench_e2e.py --models llama_1b,gpt2_124m --iters 20 --warmup 3 \
        --out "$OUT" --time-budget-s "$budget" ${E2E_ARGS:-}
    local rc=$?
    ((rc == 124 || rc == 137)) && echo "e2e benchmark: cut at the ${t}s limit; the tables hold the rows so far"
    echo "e2e benchmark: exit $rc"
}

lowprec_bench() {
    local t budget
    # FlashOptim and optimi, the peers' rows: pure-Python wheels that the GPU machine lacks,
    # carried in wheels/ (an ignored folder: the device tool's carry must name it).
    if compgen -G "wheels/*.whl" >/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile wheels/*.whl 2>&1 | tail -n 3
        echo "peer wheels ($(ls wheels/*.whl | xargs -n1 basename | tr '\n' ' ')): pip exit ${PIPESTATUS[0]}"
    fi
    t=$(cap "${LOWPREC_CAP_S:-450}" $((STEP_RESERVE + NCU_RESERVE)))
    no_time "$t" "low-precision benchmark" && return
    # As in step_bench: stop starting rows 15 s before the hard limit.
    budget=$((t > 20 ? t - 15 : 5))
    say "low-precision benchmark (issue 12): step, e2e, loss parts, limit ${t}s"
    # shellcheck disable=SC2086  # LOWPREC_ARGS is a list of arguments
    timeout -k 10 "$t" python3 bench/bench_lowprec.py --out "$OUT" --time-budget-s "$budget" ${LOWPREC_ARGS:-}
    local rc=$?
    ((rc == 124 || rc == 137)) && echo "low-precision benchmark: cut at the ${t}s limit; the tables hold the rows so far"
    echo "low-precision benchmark: exit $rc"
}

step_bench() {
    local t budget
    t=$(cap 100000 $((NCU_RESERVE + 5)))
    no_time "$t" "step benchmark" && return
    # bench_step.py stops starting providers 15 s before the hard limit, so it writes its tables.
    # (--time-budget-s 0 would mean no limit, hence the floor of 5.)
    budget=$((t > 20 ? t - 15 : 5))
    say "step benchmark, limit ${t}s"
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
    timeout -k 10 "$t" python3 bench/bench_step.py --out-dir "$OUT" ${NAME:+--name "$NAME"} \
        --time-budget-s "$budget" ${BENCH_ARGS:-}
    local rc=$?
    ((rc == 124 || rc == 137)) && echo "step benchmark: cut at the ${t}s limit; the tables hold the rows so far"
    echo "step benchmark: exit $rc"
}

fsdp_bench() {
    local t world gpus
    t=$(cap "${FSDP_CAP_S:-300}" $((NCU_RESERVE + 5)))
    no_time "$t" "fsdp benchmark" && return
    gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
    # NVLink multicast stays off (the device's KINDS.md): it can take the shared host's GPUs down.
    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
    for world in ${FSDP_WORLDS:-1 2}; do
        ((world > gpus)) && { echo "fsdp: $world ranks skipped, $gpus GPUs"; continue; }
        t=$(cap "${FSDP_CAP_S:-300}" $((NCU_RESERVE + 5)))
        no_time "$t" "fsdp benchmark at $world ranks" && return
        say "fsdp benchmark: LLaMA-1B under FSDP2 on $world GPU(s), limit ${t}s"
        timeout -k 10 "$t" torchrun --standalone --nproc_per_node "$world" bench/bench_fsdp.py \
            --out "$OUT" ${FSDP_ARGS:-}
        echo "fsdp benchmark at $world ranks: exit $?"
    done
}

ncu_profile() {
    local t
    t=$(cap "${NCU_CAP_S:-120}" 0)
    no_time "$t" "ncu" && return
    say "ncu: DRAM traffic of the fused step's kernels (${NCU_SHAPE:-llama_1b} fp32), limit ${t}s"
    # --clock-control none: measure at the clocks the benchmark ran at (ncu locks base clocks
    # otherwise). --profile-from-start off: only the steps between cudaProfilerStart/Stop.
    timeout -k 10 "$t" ncu --profile-from-start off --clock-control none \
        --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,dram__bytes.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed \
        python3 bench/bench_step.py --profile fusedopt_triton,fusedopt_cuda \
        --shapes "${NCU_SHAPE:-llama_1b}" --dtypes fp32 >"$OUT/ncu.txt" 2>&1
    echo "ncu: exit $?"
    grep -E '\(([0-9]+, ?){2}[0-9]+\)x|dram__|gpu__time|\[profile\]|==ERROR==|==WARNING==' "$OUT/ncu.txt" | head -n 80
}

main() {
    START=$SECONDS
    rm -f "$LOG"  # the build and the tests append to it
    say "fusedopt GPU suite: budget ${BUDGET}s, results in $OUT"
    versions
    if [[ -z ${SKIP_BUILD:-} ]]; then
        build
    else
        say "build skipped (SKIP_BUILD): Python package only if it is not importable"
        ensure_importable
    fi
    [[ -z ${SKIP_TESTS:-} ]] && gpu_tests
    [[ -z ${SKIP_MICRO:-} ]] && microbench
    [[ -z ${SKIP_E2E:-} ]] && e2e_bench
    [[ -n ${LOWPREC:-} ]] && lowprec_bench
    [[ -z ${SKIP_STEP:-} ]] && step_bench
    [[ -n ${FSDP:-} ]] && fsdp_bench
    [[ -n ${NCU:-} ]] && ncu_profile
    say "done in $(elapsed)s; the benchmarks' tables (also in $OUT):"
    for md in "$OUT"/*.md; do
        [[ -f $md ]] && cat "$md"
    done
}

main 2>&1 | tee "$OUT/suite.log"
