"""CPU checks of the end-to-end benchmark (bench/bench_e2e.py): a tiny run writes the rows, the
JSON and the markdown; the fusedopt-vs-torch arithmetic points the right way; a pipeline that runs
out of memory or raises is recorded and the run goes on. A few seconds on a CPU (two 2-layer
models, 1 + 2 iterations), so it stays in CI's "not slow" selection."""
import importlib.util
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import bench_e2e  # noqa: E402

needs_transformers = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None,
    reason="bench_e2e builds transformers models: pip install transformers")


def _run(tmp_path, *extra):
    return bench_e2e.main(["--device", "cpu", "--models", "tiny", "--iters", "2", "--warmup", "1",
                           "--out", str(tmp_path), "--name", "e2e_test", *extra])


@needs_transformers
def test_tiny_cpu_run(tmp_path, monkeypatch):
    import transformers
    monkeypatch.setenv("GIT_COMMIT", "abc1234")
    assert _run(tmp_path, "--pipelines", "torch_fused_clip,fusedopt_adamw,torch_fp16_scaler") == 0
    data = json.loads((tmp_path / "e2e_test.json").read_text())
    md = (tmp_path / "e2e_test.md").read_text()
    assert sorted(data) == ["comparisons", "header", "rows"]
    header = data["header"]
    assert header["device"] == "cpu" and header["torch"] == torch.__version__
    assert header["transformers"] == transformers.__version__ and header["git_commit"] == "abc1234"
    for line in ("- device: cpu", f"- torch: {torch.__version__}",
                 f"- transformers: {transformers.__version__}", "- git_commit: abc1234",
                 f"- date: {header['date']}", "- triton: "):
        assert line in md

    rows = {(r["model"], r["pipeline"]): r for r in data["rows"]}
    assert list(rows) == [(m, p) for m in ("tiny_llama", "tiny_gpt2")
                          for p in ("torch_fused_clip", "fusedopt_adamw", "torch_fp16_scaler")]
    for model in ("tiny_llama", "tiny_gpt2"):
        torch_row = rows[(model, "torch_fused_clip")]
        assert torch_row["status"] == "ok", torch_row["note"]
        assert torch_row["optimizer"] == "clip_grad_norm_ + torch.optim.AdamW(fused=True)"
        for name in bench_e2e.TIME_FIGURES:
            fig = torch_row[name]
            assert 0 <= fig["p20"] <= fig["median"] <= fig["p80"]
            assert len(torch_row["samples"][name]) == 2
        s = torch_row["samples"]
        for i in range(2):  # the three parts tile the iteration: same four time points
            parts = s["fwd_ms"][i] + s["bwd_ms"][i] + s["opt_ms"][i]
            assert parts == pytest.approx(s["iter_ms"][i], abs=1e-3)
        assert torch_row["peak_gb"] is None  # no memory figures on the CPU
        assert torch_row["loss_first"] == pytest.approx(5.5, abs=0.3)  # ~ln(256) at random init
        assert f"| {model} | torch_fused_clip | ok | " in md

        skipped = rows[(model, "torch_fp16_scaler")]
        assert skipped["status"] == "skipped" and "CUDA" in skipped["note"]
        assert f"| {model} | torch_fp16_scaler | skipped | " in md

        # fusedopt is being rewritten; the harness must record either outcome.
        fo = rows[(model, "fusedopt_adamw")]
        comparisons = [c for c in data["comparisons"] if c["model"] == model]
        if fo["status"] == "ok":
            assert fo["optimizer"].startswith("fusedopt.AdamW(") and "backend='reference'" in fo["optimizer"]
            (c,) = comparisons
            assert (c["pipeline"], c["baseline"]) == ("fusedopt_adamw", "torch_fused_clip")
            it = c["figures"]["iter_ms"]
            want = torch_row["iter_ms"]["median"] / fo["iter_ms"]["median"]
            assert it["torch_over_fusedopt"] == pytest.approx(want)
            assert f"| {model} | fusedopt_adamw | torch_fused_clip | " in md
        else:
            assert fo["status"] == "error" and fo["note"]
            assert comparisons == []


def _row(model, pipeline, iter_ms, opt_ms, peak_gb, status="ok"):
    row = bench_e2e.new_row(bench_e2e.MODELS[model], bench_e2e.PIPELINES[pipeline], status)
    for name in bench_e2e.TIME_FIGURES:
        row[name] = {"median": 1.0, "p20": 1.0, "p80": 1.0}
    row["iter_ms"] = {"median": iter_ms, "p20": iter_ms - 1, "p80": iter_ms + 1}
    row["opt_ms"] = {"median": opt_ms, "p20": opt_ms, "p80": opt_ms}
    row["peak_gb"], row["steady_gb"] = peak_gb, peak_gb / 2
    return row


def test_comparison_direction():
    """torch 120 ms per iteration, fusedopt 100 ms: fusedopt is 1.2x faster and saves 20 ms;
    optimizer part 30 vs 10 ms: 3x, -20 ms; peak 10 vs 8 GB: 1.25x smaller, -2 GB."""
    rows = [_row("llama_1b", "torch_fused_clip", 120.0, 30.0, 10.0),
            _row("llama_1b", "fusedopt_adamw", 100.0, 10.0, 8.0),
            # No torch_fp16_scaler row for llama_1b: no comparison for this one.
            _row("llama_1b", "fusedopt_fp16_scaler", 90.0, 5.0, 8.0),
            # A failed fusedopt row and a baseline of another model give none either.
            _row("llama_1b", "fusedopt_adamc_stats", 1.0, 1.0, 1.0, status="error"),
            _row("gpt2_124m", "torch_bf16_params", 50.0, 4.0, 3.0),
            _row("llama_1b", "fusedopt_bf16_params", 40.0, 2.0, 2.0)]
    (c,) = bench_e2e.compare(rows)
    assert (c["model"], c["pipeline"], c["baseline"]) == ("llama_1b", "fusedopt_adamw", "torch_fused_clip")
    f = c["figures"]
    assert f["iter_ms"] == {"torch": 120.0, "fusedopt": 100.0, "fusedopt_minus_torch": -20.0,
                            "torch_over_fusedopt": pytest.approx(1.2)}
    assert f["opt_ms"]["torch_over_fusedopt"] == pytest.approx(3.0)
    assert f["opt_ms"]["fusedopt_minus_torch"] == pytest.approx(-20.0)
    assert f["peak_gb"]["torch_over_fusedopt"] == pytest.approx(1.25)
    assert f["peak_gb"]["fusedopt_minus_torch"] == pytest.approx(-2.0)
    assert f["steady_gb"]["torch_over_fusedopt"] == pytest.approx(1.25)
    assert "peak_reserved_gb" not in f  # not measured in these rows: left out, not divided
    md = bench_e2e.markdown({"name": "t", "notes": []}, rows, [c])
    assert ("| llama_1b | fusedopt_adamw | torch_fused_clip | -20.00 | 1.200 | -20.00 | 3.000 "
            "| +0.00 | 1.000 | -2.00 | 1.250 | -1.00 | 1.250 |") in md


@needs_transformers
def test_oom_and_errors_are_recorded(tmp_path, monkeypatch):
    def fail(model, pipeline, device, args):
        if pipeline.name == "torch_fused_clip":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        raise RuntimeError("broken step\nsecond line")

    monkeypatch.setattr(bench_e2e, "measure", fail)
    assert _run(tmp_path, "--pipelines", "torch_fused_clip,fusedopt_adamw") == 0
    rows = json.loads((tmp_path / "e2e_test.json").read_text())["rows"]
    assert [(r["model"], r["pipeline"], r["status"]) for r in rows] == [
        ("tiny_llama", "torch_fused_clip", "oom"), ("tiny_llama", "fusedopt_adamw", "error"),
        ("tiny_gpt2", "torch_fused_clip", "oom"), ("tiny_gpt2", "fusedopt_adamw", "error")]
    assert rows[0]["note"] == "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert rows[1]["note"] == "RuntimeError: broken step"
    assert "| tiny_gpt2 | fusedopt_adamw | error | " in (tmp_path / "e2e_test.md").read_text()


@needs_transformers
def test_rounds_pool_each_pipelines_iterations(tmp_path, capsys):
    assert _run(tmp_path, "--pipelines", "torch_fused_clip,fusedopt_adamw", "--models",
                "tiny_gpt2", "--rounds", "2") == 0
    # The second round runs the pipelines in reverse order.
    printed = [line.split()[1] for line in capsys.readouterr().out.splitlines()
               if line.startswith(" tiny_gpt2")]
    assert printed == ["torch_fused_clip", "fusedopt_adamw", "fusedopt_adamw", "torch_fused_clip"]
    data = json.loads((tmp_path / "e2e_test.json").read_text())
    assert data["header"]["rounds"] == 2
    assert [r["pipeline"] for r in data["rows"]] == ["torch_fused_clip", "fusedopt_adamw"]
    row = data["rows"][0]
    assert row["status"] == "ok" and row["rounds"] == 2
    for name in bench_e2e.TIME_FIGURES:
        samples = row["samples"][name]
        assert len(samples) == 4 and len(row["round_medians"][name]) == 2
        assert row[name]["median"] == pytest.approx(bench_e2e.spread(samples)["median"])


def test_merge_rounds_names_a_failed_round():
    model, pipeline = bench_e2e.MODELS["tiny_gpt2"], bench_e2e.PIPELINES["torch_fused_clip"]
    ok = bench_e2e.new_row(model, pipeline, "ok")
    samples = {name: [1.0, 3.0] for name in bench_e2e.TIME_FIGURES}
    ok.update({name: bench_e2e.spread(v) for name, v in samples.items()}, samples=samples,
              peak_gb=2.0, wall_s=1.0, loss_last=5.0)
    failed = bench_e2e.new_row(model, pipeline, "oom", "OutOfMemoryError: tried 2 GB")
    failed["wall_s"] = 0.5
    row = bench_e2e.merge_rounds([ok, failed])
    assert row["status"] == "ok" and row["rounds"] == 1 and row["peak_gb"] == 2.0
    assert row["note"] == "round 2: oom: OutOfMemoryError: tried 2 GB" and row["wall_s"] == 1.5
    assert bench_e2e.merge_rounds([failed])["status"] == "oom"
