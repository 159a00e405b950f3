"""pytest-benchmark microbenchmarks of one optimizer step, fp32, on the GPU.

These time wall clock with a torch.cuda.synchronize() after every step (pytest-benchmark has no
device timer), so each figure carries ~10-20 us of sync overhead; the numbers to report come from
bench/bench_step.py, which times with CUDA events. These exist to track regressions with
pytest-benchmark's own tooling (--benchmark-json, --benchmark-compare).

  python3 -m pytest -q bench/test_bench_step.py --benchmark-json=microbench.json
"""
import os
import sys

import pytest
import torch

pytest.importorskip("pytest_benchmark")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_step  # noqa: E402

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

PROVIDERS = ["stock_pipeline", "torch_fused", "fusedopt_triton", "fusedopt_triton_stats",
             "fusedopt_cuda", "fusedopt_cuda_stats"]
# GPT-2 124M: one large-tensor case; the 1200-tensor net: the launch-overhead case. The 1.1B set
# takes 17.6 GB and ~12 ms a step; bench_step.py covers it.
SHAPES = ["gpt2_124m", "convnet_1200"]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES)
def test_step_fp32(benchmark, shape, provider):
    device = torch.device("cuda")
    spec = bench_step.PROVIDERS[provider]
    reason = bench_step.unavailable(spec, device, bench_step.fusedopt_status())
    if reason:
        pytest.skip(reason)
    shapes = bench_step.SHAPES[shape]()
    params = bench_step.make_params(shapes, torch.float32, device)
    before = bench_step.probe_params(params)
    step = spec.build(params, device)
    for _ in range(3):  # Triton compilation and lazy state creation stay out of the rounds
        step()
    torch.cuda.synchronize()

    def one_step():
        step()
        torch.cuda.synchronize()

    n = sum(bench_step.numel(s) for _, s in shapes)
    benchmark.extra_info.update(shape=shape, provider=provider, n_tensors=len(shapes), n_params=n,
                                bytes_per_step=bench_step.step_bytes(n, torch.float32))
    benchmark.pedantic(one_step, rounds=30, warmup_rounds=2, iterations=1)
    assert bench_step.check_moved(params, before) == ""
    del params, step
    bench_step.free_memory(device)
