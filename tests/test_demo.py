"""The AdamW vs AdamC demo (fusedopt.demo) and the `python -m fusedopt` command line: the demo's
pieces, tiny end-to-end runs and their log, the help texts, and (slow) the default run's claim that
AdamW's end-of-training gradient norm surges where AdamC's does not."""
import json
import math
import subprocess
import sys

import pytest
import torch

from fusedopt import demo
from fusedopt.demo_data import Batches, generate_corpus, load_file
from fusedopt.demo_model import GPT, GPTConfig, param_groups
from fusedopt.tensorboard import log_stats

TINY = ["--steps", "24", "--n-layer", "1", "--d-model", "16", "--n-head", "2", "--context", "16",
        "--batch-size", "4", "--no-progress"]


@pytest.fixture(autouse=True)
def restore_torch_threads():
    """The demo sets torch's thread count (--threads); the tests after these keep theirs."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "fusedopt", *args], capture_output=True,
                          text=True, timeout=120)


def test_corpus_is_deterministic_and_structured():
    a, b = generate_corpus(num_chars=20_000), generate_corpus(num_chars=20_000)
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val)
    assert len(a.train) + len(a.val) == 20_000
    # Letters are drawn uniformly, so context-free prediction is hard (~log 26 nats) ...
    assert a.unigram_entropy() > 3.0
    # ... while the text is built from a small lexicon: few distinct words.
    text = "".join(a.vocab[i] for i in a.train)
    assert len(set(text.replace(".", " ").split())) <= 32


def test_load_file_is_byte_level(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("héllo wörld\n" * 200, encoding="utf-8")
    corpus = load_file(path)
    assert corpus.vocab_size == 256
    assert int(corpus.train.max()) > 127  # UTF-8 bytes of é and ö, not characters
    (tmp_path / "short.txt").write_text("too short")
    with pytest.raises(ValueError, match="too little"):
        load_file(tmp_path / "short.txt")


def test_batches_repeat_with_the_seed():
    tokens = torch.arange(1000)
    x1, y1 = Batches(tokens, 4, 8, seed=3).next()
    x2, y2 = Batches(tokens, 4, 8, seed=3).next()
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.equal(y1, x1 + 1)  # targets are the next tokens


def test_param_groups_split_normalized_linear_layers():
    model = GPT(GPTConfig(vocab_size=29, context=8, n_layer=2, n_head=2, d_model=8))
    decayed, other = param_groups(model, weight_decay=0.5)
    names = [n for n, _ in decayed["params"]]
    assert decayed["weight_decay"] == 0.5 and other["weight_decay"] == 0.0
    assert names == [f"blocks.{i}.{m}.weight" for i in range(2)
                     for m in ("qkv", "attn_out", "fc", "fc_out")]
    other_names = {n for n, _ in other["params"]}
    assert {"head.weight", "tok_emb.weight", "pos_emb.weight", "ln_f.weight"} <= other_names
    assert len(names) + len(other_names) == len(list(model.parameters()))


def test_warmup_cosine_reaches_zero():
    f = demo.warmup_cosine(steps=100, warmup=10)
    assert f(0) == pytest.approx(0.1)
    assert f(9) == pytest.approx(1.0)
    assert f(99) == pytest.approx(0.0, abs=1e-12)
    values = [f(s) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_surge_ratio():
    assert demo.surge_ratio([1.0] * 100) == pytest.approx(1.0)
    # Last 10% doubled; the middle's minimum window is 1.
    assert demo.surge_ratio([3.0] * 25 + [1.0] * 65 + [2.0] * 10) == pytest.approx(2.0)
    # A dip before T/4 is outside the middle and does not count.
    assert demo.surge_ratio([0.1] * 25 + [1.0] * 65 + [2.0] * 10) == pytest.approx(2.0)
    # Windowed: a single low step in the middle moves the minimum by 1/10 of its depth only.
    values = [1.0] * 100
    values[50] = 0.0
    assert demo.surge_ratio(values) == pytest.approx(1 / 0.9)


class FakeWriter:
    def __init__(self):
        self.scalars = {}

    def add_scalar(self, tag, value, step):
        self.scalars[tag] = (value, step)


class FakeStats:
    def __init__(self, record):
        self.record = record
        self.syncs = 0

    def to_dict(self):
        self.syncs += 1
        return self.record


def test_log_stats_writes_globals_and_tensors():
    record = {"global": {"grad_norm": 2.0, "clip_coef": 0.5},
              "tensors": {"w": {"grad_norm": 1.0, "weight_norm": 3.0},
                          "b": {"grad_norm": 0.5, "weight_norm": 1.0}}}
    writer = FakeWriter()
    stats = FakeStats(record)
    log_stats(writer, stats, step=7)
    assert stats.syncs == 1
    assert writer.scalars == {
        "global/grad_norm": (2.0, 7), "global/clip_coef": (0.5, 7),
        "grad_norm/w": (1.0, 7), "weight_norm/w": (3.0, 7),
        "grad_norm/b": (0.5, 7), "weight_norm/b": (1.0, 7),
    }
    writer = FakeWriter()
    log_stats(writer, record, step=1, prefix="adamc/")  # the dict from to_dict() works too
    assert writer.scalars["adamc/global/grad_norm"] == (2.0, 1)


def _check_outputs(out, steps, tensor_steps):
    """The files of a run of `steps` steps whose log has per-tensor figures on `tensor_steps`."""
    assert (out / "demo.png").stat().st_size > 10_000
    rows = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert [r["run"] for r in rows] == ["AdamW"] * steps + ["AdamC"] * steps
    assert [r["step"] for r in rows] == list(range(1, steps + 1)) * 2
    for r in rows:
        assert math.isfinite(r["loss"]) and r["lr"] >= 0 and r["step_ms"] > 0
        assert {"grad_norm", "clip_coef", "found_inf", "loss_scale", "skipped_steps"} == set(
            r["global"])
        assert r["normalized"]["g_over_w"] > 0 and r["normalized"]["weight_norm"] > 0
        if r["step"] in tensor_steps:
            assert "blocks.0.qkv.weight" in r["tensors"]
            assert {"grad_norm", "weight_norm", "update_norm"} <= set(r["tensors"]["head.weight"])
        else:
            assert "tensors" not in r
    summary = json.loads((out / "summary.json").read_text())
    for run in ("AdamW", "AdamC"):
        assert math.isfinite(summary["runs"][run]["surge_ratio"])
        assert math.isfinite(summary["runs"][run]["val_loss"])
    return rows


def test_demo_end_to_end_tiny(tmp_path, capsys):
    out = tmp_path / "out"
    summary = demo.main(TINY + ["--out", str(out), "--device", "cpu", "--backend", "reference"])
    # The default --tensor-stats-every (500) is beyond 24 steps: the first and the last step only.
    rows = _check_outputs(out, steps=24, tensor_steps={1, 24})
    printed = capsys.readouterr().out
    assert f"output: {out.resolve()}" in printed and f"wrote to {out.resolve()}" in printed
    assert "steps.jsonl" in printed
    # Same seed, same batches: the first step (lr identical, no decay difference yet) matches.
    first = [r for r in rows if r["step"] == 1]
    assert first[0]["loss"] == first[1]["loss"]
    assert set(summary) == {"AdamW", "AdamC"}


def test_demo_on_a_file_with_tensorboard_hook(tmp_path, monkeypatch):
    data = tmp_path / "data.txt"
    data.write_text("the quick brown fox jumps over the lazy dog. " * 100)
    written = []

    class Writer(FakeWriter):
        def __init__(self, log_dir):
            super().__init__()
            written.append(self)

        def close(self):
            pass

    monkeypatch.setattr(demo, "_summary_writer", Writer)
    out = tmp_path / "out"
    demo.main(TINY + ["--out", str(out), "--data", str(data), "--tensorboard", str(tmp_path / "tb"),
                      "--tensor-stats-every", "10"])
    _check_outputs(out, steps=24, tensor_steps={1, 10, 20, 24})
    assert len(written) == 2 and "train/loss" in written[0].scalars
    # TensorBoard gets the per-tensor figures on the same steps as the log.
    assert written[0].scalars["grad_norm/head.weight"][1] == 24


def test_tensor_stats_every_step_and_the_compact_log(tmp_path):
    demo.main(TINY + ["--out", str(tmp_path / "all"), "--tensor-stats-every", "1"])
    _check_outputs(tmp_path / "all", steps=24, tensor_steps=set(range(1, 25)))
    demo.main(TINY + ["--out", str(tmp_path / "compact")])
    lines = (tmp_path / "compact" / "steps.jsonl").read_text().splitlines()
    # A row without per-tensor figures stays small whatever the model: at the defaults (6000
    # steps, 12000 rows) the log is a few MB, not the 71 MB of every figure at every step.
    assert max(len(line) for line in lines if '"tensors"' not in line) < 500
    full = (tmp_path / "all" / "steps.jsonl").stat().st_size
    assert (tmp_path / "compact" / "steps.jsonl").stat().st_size < full / 3
    # Bit-identical runs: the log's form does not change the training.
    compact = [json.loads(line)["loss"] for line in lines]
    every = [json.loads(line)["loss"]
             for line in (tmp_path / "all" / "steps.jsonl").read_text().splitlines()]
    assert compact == every


def test_threads(tmp_path, capsys):
    demo.main(TINY + ["--out", str(tmp_path), "--threads", "2"])
    assert torch.get_num_threads() == 2
    assert "threads: 2" in capsys.readouterr().out
    assert json.loads((tmp_path / "summary.json").read_text())["settings"]["threads"] == 2


def test_bad_flags_are_refused(capsys):
    for flags in (["--tensor-stats-every", "0"], ["--threads", "-1"], ["--steps", "10"]):
        with pytest.raises(SystemExit) as exit_info:
            demo.parse_args(flags)
        assert exit_info.value.code == 2
    assert "--tensor-stats-every must be at least 1" in capsys.readouterr().err


def test_missing_demo_packages_stop_before_training(tmp_path, monkeypatch):
    find_spec = demo.importlib.util.find_spec
    monkeypatch.setattr(demo.importlib.util, "find_spec",
                        lambda name: None if name == "matplotlib" else find_spec(name))
    with pytest.raises(SystemExit, match=r"needs matplotlib: pip install matplotlib .*\[demo\]"):
        demo.main(TINY + ["--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_console_script_exits_zero(tmp_path, monkeypatch):
    """fusedopt-demo (setup.py's console script) returns the exit status 0, not the summary."""
    monkeypatch.setattr(sys, "argv", ["fusedopt-demo"] + TINY + ["--out", str(tmp_path)])
    assert demo.cli() == 0


def test_python_dash_m_fusedopt_alone_lists_the_commands():
    result = run_cli()
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: python -m fusedopt")
    for command in ("demo", "info"):
        assert f"    {command} " in result.stdout
    assert "data:" not in result.stdout  # the demo did not start
    assert run_cli("--help").stdout == result.stdout.split("\nnote: ")[0]


def test_python_dash_m_fusedopt_demo_help():
    result = run_cli("demo", "--help")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert text.startswith("usage: python -m fusedopt demo")
    for flag in ("--steps", "--tensorboard", "--tensor-stats-every", "--threads", "--out"):
        assert flag in text
    # Defaults, what it writes and how long it takes.
    assert "(default: 6000)" in text and "(default: ./demo_out)" in text
    assert "demo.png" in text and "steps.jsonl" in text and "summary.json" in text
    assert "min on a 2-core CPU" in text


def test_python_dash_m_fusedopt_info_and_errors():
    result = run_cli("info")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("fusedopt ") and "reference" in result.stdout
    assert "fusedopt._C" in result.stdout
    assert "master_weight_bits runs on: reference, triton, cuda\n" in result.stdout
    assert "state_dtype='int8' runs on: reference, triton, cuda\n" in result.stdout
    bad = run_cli("train")
    assert bad.returncode == 2 and "invalid choice: 'train'" in bad.stderr


@pytest.mark.slow
def test_default_run_adamw_surges_adamc_does_not(tmp_path):
    """The default setting (about 3 minutes on a 2-core CPU); numbers recorded in docs/demo.md."""
    summary = demo.main(["--out", str(tmp_path), "--no-progress"])
    adamw, adamc = summary["AdamW"], summary["AdamC"]
    assert adamw["surge_ratio"] > 1.0  # an actual rise at the end, not only a smaller fall
    assert adamw["surge_ratio"] > 1.1 * adamc["surge_ratio"]
    assert adamw["g_over_w_surge_ratio"] > 1.3 * adamc["g_over_w_surge_ratio"]
