"""CPU checks of the low-precision benchmark (bench/bench_lowprec.py): a --dry-run of its three
parts for a few rows writes the JSON and the markdown with their fields; a mode the optimizer
refuses is recorded as unavailable and a peer that does not import as not installed; the lr
schedule and the byte formula. A few seconds on a CPU (tiny models, 6 loss steps), so it stays
in CI's "not slow" selection."""
import importlib.util
import json
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import bench_lowprec  # noqa: E402
import bench_step  # noqa: E402

needs_transformers = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None,
    reason="bench_lowprec builds transformers models: pip install transformers")

ROWS = ["torch_fp32", "fusedopt_bf16_m32_fp32", "fusedopt_bf16_m24_int8", "flashoptim_bf16"]


@needs_transformers
def test_dry_run_writes_every_part(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_COMMIT", "abc1234")
    argv = ["--dry-run", "--out", str(tmp_path), "--name", "lp", "--rows", ",".join(ROWS)]
    assert bench_lowprec.main(argv) == 0
    data = json.loads((tmp_path / "lp.json").read_text())
    md = (tmp_path / "lp.md").read_text()
    assert sorted(data) == ["e2e", "e2e_versus", "header", "loss", "step", "targets"]
    header = data["header"]
    assert header["device"] == "cpu" and header["torch"] == torch.__version__
    assert header["git_commit"] == "abc1234" and header["parts"] == ["step", "e2e", "loss"]
    assert header["loss"]["steps"] == 6 and header["loss"]["corpus"]["bytes"] > 100_000
    assert header["step"]["shape"] == "tiny" and header["step"]["copy_gbps"] > 0
    for heading in ("## Step: tiny shapes", "## End to end: tiny_llama", "## Loss: gpt2_bytes_tiny",
                    "## Targets (issue 12)", "- git_commit: abc1234"):
        assert heading in md

    # An int8 mode the optimizer does not take yet is "unavailable"; a peer is either missing
    # ("not installed") or, for FlashOptim on the CPU, "skipped".
    int8_status = {"ok", "unavailable"}
    peer_status = {"not installed", "skipped"}

    loss = {r["row"]: r for r in data["loss"]}
    assert list(loss) == ROWS
    base = loss["torch_fp32"]
    assert base["status"] == "ok", base["note"]
    assert base["final_loss"] == pytest.approx(math.log(256), abs=0.5)  # random init, 6 steps
    assert base["minus_torch_fp32"] == 0.0 and base["peak_gb"] is None  # no memory figures on the CPU
    assert 0 <= base["opt_ms"]["p20"] <= base["opt_ms"]["median"] <= base["opt_ms"]["p80"]
    assert len(base["losses_every_10"]) == 1
    m32 = loss["fusedopt_bf16_m32_fp32"]
    assert m32["status"] == "ok", m32["note"]
    assert m32["backend"] == "reference" and abs(m32["minus_torch_fp32"]) < 0.05
    assert loss["fusedopt_bf16_m24_int8"]["status"] in int8_status
    assert loss["flashoptim_bf16"]["status"] in peer_status
    assert "| torch_fp32 | fp32 params + bf16 autocast" in md

    step = {r["provider"]: r for r in data["step"]}
    assert list(step) == ["fusedopt_bf16_m32_fp32", "fusedopt_bf16_m24_int8", "flashoptim_bf16"]
    s = step["fusedopt_bf16_m32_fp32"]
    assert s["status"] == "ok", s["note"]
    formula = (s["bytes_norm_per_param"], s["bytes_update_per_param"], s["state_bytes_per_param_formula"])
    assert formula == (2, 26, 10)
    assert s["bytes_per_step"] == 28 * s["n_params"] and s["gbps"] > 0 and s["frac_copy_bw"] > 0
    assert s["ms_p20"] <= s["ms_median"] <= s["ms_p80"] and s["backend"] == "reference"
    assert s["state_bytes_per_param"] is None  # allocator statistics: CUDA only
    assert step["fusedopt_bf16_m24_int8"]["status"] in int8_status
    assert step["flashoptim_bf16"]["status"] in peer_status

    e2e = {r["pipeline"]: r for r in data["e2e"]}
    assert list(e2e) == ["torch_fp32", "fusedopt_bf16_m32_fp32", "fusedopt_bf16_m24_int8"]
    assert e2e["torch_fp32"]["status"] == "ok" and e2e["torch_fp32"]["param_dtype"] == "float32"
    assert e2e["fusedopt_bf16_m32_fp32"]["param_dtype"] == "bfloat16"
    assert e2e["fusedopt_bf16_m32_fp32"]["status"] == "ok", e2e["fusedopt_bf16_m32_fp32"]["note"]
    # torch_bf16 did not run: each measured row is compared with the fp32 baseline only.
    versus = {v["pipeline"]: v for v in data["e2e_versus"]}
    assert {v["baseline"] for v in versus.values()} == {"torch_fp32"}
    versus = versus["fusedopt_bf16_m32_fp32"]
    assert versus["iter_x"] == pytest.approx(
        e2e["torch_fp32"]["iter_ms"]["median"] / e2e["fusedopt_bf16_m32_fp32"]["iter_ms"]["median"])

    targets = {t["name"]: t for t in data["targets"]}
    assert targets["loss: |fusedopt_bf16_m32_fp32 - torch_fp32| final loss"]["met"] is True


def test_refused_mode_and_missing_peer():
    cpu = torch.device("cpu")
    int4 = bench_lowprec.Row("fusedopt_int4", "fusedopt", True, "", master_bits=32, state="int4")
    status, note = bench_lowprec.unavailable(int4, cpu)
    assert status == "unavailable" and note.startswith("ValueError: ") and "state_dtype" in note
    assert bench_lowprec.unavailable(bench_lowprec.ROWS["fusedopt_bf16_m32_bf16"], cpu) is None
    if importlib.util.find_spec("optimi") is None:
        assert bench_lowprec.unavailable(bench_lowprec.ROWS["optimi_bf16"], cpu)[0] == "not installed"


def test_lr_schedule():
    lr = bench_lowprec.lr_schedule(1500, 6e-4, 100)
    assert lr[0] == pytest.approx(6e-6) and lr[99] == pytest.approx(6e-4) and lr[100] == pytest.approx(6e-4)
    assert lr[-1] == 0.0 and all(a >= b for a, b in zip(lr[100:], lr[101:]))
    assert lr[100 + 1399 // 2] == pytest.approx(3e-4, rel=2e-3)  # half way down the cosine


def test_bytes_per_param():
    rows = bench_lowprec.ROWS
    # fp32 moments without a master: bench_step's bf16 count.
    assert sum(bench_lowprec.bytes_per_param(rows["fusedopt_bf16_none_fp32"])[:2]) == bench_step.step_bytes(
        1, torch.bfloat16)
    assert bench_lowprec.bytes_per_param(rows["torch_bf16"]) == (2, 14, 4)
    assert bench_lowprec.bytes_per_param(rows["optimi_bf16"]) == (2, 18, 6)
    # 24-bit master (1 B) + two int8 moments with one scale byte per 32 elements each.
    assert bench_lowprec.bytes_per_param(rows["fusedopt_bf16_m24_int8"]) == (2, 12.125, 3.0625)
    assert bench_lowprec.bytes_per_param(rows["flashoptim_bf16"])[2] == 3.125  # fp16 scales


def test_e2e_rounds_pool_each_rows_iterations(tmp_path):
    argv = ["--dry-run", "--e2e", "--out", str(tmp_path), "--name", "lp", "--rows",
            "torch_bf16,fusedopt_bf16_m32_fp32", "--e2e-rounds", "2"]
    assert bench_lowprec.main(argv) == 0
    data = json.loads((tmp_path / "lp.json").read_text())
    assert data["header"]["e2e"]["rounds"] == 2
    assert [r["pipeline"] for r in data["e2e"]] == ["torch_bf16", "fusedopt_bf16_m32_fp32"]
    for row in data["e2e"]:
        assert row["status"] == "ok", row["note"]
        assert row["rounds"] == 2 and len(row["samples"]["iter_ms"]) == 4
