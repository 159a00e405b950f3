#!/usr/bin/env bash
# fusedopt distributed suite for one host with 2 or more GPUs, run from the repository root:
#
#   GIT_COMMIT=<sha> OUT=/some/dir bash bench/distributed_suite.sh
#
# Steps, each time-boxed so the whole suite ends inside SUITE_BUDGET_S (default 540 s):
#   1. versions: GPUs, torch, NCCL, triton                                        -> suite.log
#   2. fusedopt importable (pip install -e . without network if not; BUILD_CUDA=1 also
#      builds the CUDA extension, otherwise the kernels are Triton's)              -> build.log
#   3. the GPU tests of tests/test_distributed.py (NCCL, 2 GPUs) and the one-optimizer-
#      across-two-devices test of tests/test_gpu.py                                -> tests.log
#   4. bench/bench_distributed.py: sharded vs all-reduce + fused vs fused on one GPU at
#      the LLaMA 1.1B shapes, fp32 and bf16 (writes after every row)              -> distributed.json, .md
# The markdown table is printed last.
#
# NVLink multicast (NVLS) stays off: NCCL_NVLS_ENABLE=0 is exported for every step.
# Knobs: SUITE_BUDGET_S, TESTS_CAP_S (default 200), BENCH_ARGS (extra bench arguments),
# BUILD_CUDA=1, SKIP_TESTS=1, GIT_COMMIT (recorded in the results).
set -u -o pipefail
: "${OUT:?set OUT to the folder the results go to}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.." || exit 1
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0

BUDGET=${SUITE_BUDGET_S:-540}
# Least time the benchmark needs, held back from the earlier steps (seconds).
BENCH_FLOOR=150
START=$SECONDS

source bench/suite_time.sh

versions() {
    say "versions"
    nvidia-smi -L || echo "nvidia-smi failed"
    python3 - <<'EOF'
import torch
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), {torch.cuda.device_count()} GPUs")
try:
    print("NCCL", ".".join(map(str, torch.cuda.nccl.version())))
except Exception as e:
    print(f"NCCL version unknown: {e}")
try:
    import triton
    print(f"triton {triton.__version__}")
except ImportError as e:
    print(f"triton missing: {e}")
EOF
    echo "NCCL_NVLS_ENABLE=$NCCL_NVLS_ENABLE"
    echo "git commit: ${GIT_COMMIT:-unknown (set GIT_COMMIT)}"
}

ensure_importable() {
    local skip=1
    [[ -n ${BUILD_CUDA:-} ]] && skip=""
    if python3 -c "import fusedopt.triton_kernels, fusedopt.distributed" 2>/dev/null && [[ -n $skip ]]; then
        echo "fusedopt importable"
        return
    fi
    local t
    t=$(cap 240 $((BENCH_FLOOR + 60)))
    say "pip install -e . (FUSEDOPT_SKIP_CUDA_BUILD=${skip:-0}), limit ${t}s"
    FUSEDOPT_SKIP_CUDA_BUILD=${skip:-0} FUSEDOPT_CUDA_ARCHS=${FUSEDOPT_CUDA_ARCHS:-90} \
        timeout -k 10 "$t" python3 -m pip install --no-build-isolation --no-deps --no-index -e . \
        >"$OUT/build.log" 2>&1
    echo "pip exit $?"
    python3 -c "import fusedopt.distributed" || echo "fusedopt still not importable: the steps below will fail"
}

gpu_tests() {
    local t
    t=$(cap "${TESTS_CAP_S:-200}" "$BENCH_FLOOR")
    ((t > 0)) || { say "tests skipped: no time left"; return; }
    say "GPU tests of tests/test_distributed.py, limit ${t}s"
    # SIGINT at the limit: pytest reports the test it was in and the summary so far.
    timeout -s INT -k 15 "$t" python3 -m pytest -q -p no:cacheprovider -m gpu -rs \
        --durations=10 tests/test_distributed.py \
        "tests/test_gpu.py::test_one_optimizer_across_two_devices_shares_the_clip_norm" \
        >"$OUT/tests.log" 2>&1
    local rc=$?
    tail -n 20 "$OUT/tests.log"
    echo "tests: exit $rc"
}

bench() {
    local t
    t=$(cap 100000 5)
    ((t > 20)) || { say "benchmark skipped: no time left"; return; }
    say "distributed benchmark, limit ${t}s"
    # No provider starts in the last 60 s, so the tables get written before the hard limit.
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
    timeout -k 10 "$t" python3 bench/bench_distributed.py --out-dir "$OUT" \
        --time-budget-s $((t - 60 > 10 ? t - 60 : 10)) ${BENCH_ARGS:-} >"$OUT/bench.log" 2>&1
    local rc=$?
    grep -iE "error|warn" "$OUT/bench.log" | grep -v FutureWarning | head -n 20
    echo "benchmark: exit $rc"
}

main() {
    say "fusedopt distributed suite: budget ${BUDGET}s, results in $OUT"
    versions
    ensure_importable
    [[ -z ${SKIP_TESTS:-} ]] && gpu_tests
    bench
    say "done in $(elapsed)s"
    if [[ -f $OUT/distributed.md ]]; then
        cat "$OUT/distributed.md"
    else
        echo "no benchmark table (see $OUT/bench.log)"
    fi
}

main 2>&1 | tee "$OUT/suite.log"
