"""Rows -> speedups, target checks, JSON and markdown for bench/bench_step.py.

Kept apart from the harness so that the CPU test can check the arithmetic and the table writer
without building optimizers. A row is a plain dict (see bench_step.make_row); the writers add
nothing that is not in the rows or the header, so the JSON and the markdown always agree.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable

# The fusedopt rows the speedup ratios are taken against: the eager full step with statistics off,
# as a user calls it. The stats and graph variants get their own rows and ratios in the JSON.
FUSEDOPT_REFERENCE_ROWS = ("fusedopt_triton", "fusedopt_cuda")

# Issue 3 section 7 and issue 4 (Performance): fusedopt full step, fp32, on an H100.
SPEEDUP_TARGETS = {"gpt2_124m": 3.0, "llama_1b": 1.7, "convnet_1200": 15.0}
COPY_BW_TARGETS = {"fusedopt_triton": 0.85, "fusedopt_cuda": 0.88}
STATS_OVERHEAD_MAX = 0.03
CUDA_VS_TRITON_MAX = 1.03


def results_name(prefix: str, device_name: str | None) -> str:
    """The results file stem: <prefix>_<device slug> (e.g. step_nvidia-h100-80gb-hbm3), or
    <prefix>_cpu without a GPU."""
    if device_name is None:
        return f"{prefix}_cpu"
    return f"{prefix}_" + re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")


def comma_choices(ap, flag: str, value: str, table) -> list[str]:
    """The keys named by a command-line value: 'all' or a comma list; an argparse error naming
    the unknown ones."""
    values = list(table) if value == "all" else [v for v in value.split(",") if v]
    bad = [v for v in values if v not in table]
    if bad:
        ap.error(f"{flag}: unknown {bad}; choose from {sorted(table)}")
    return values


def percentile(samples: Iterable[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]), numpy's default method, without numpy."""
    xs = sorted(samples)
    if not xs:
        raise ValueError("percentile of no samples")
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def gbps(bytes_per_step: int, ms: float) -> float:
    return bytes_per_step / (ms * 1e-3) / 1e9


def _ok(row: dict) -> bool:
    return row.get("status") == "ok" and row.get("ms_median") is not None


def add_speedups(rows: list[dict]) -> None:
    """speedup[f] = this row's ms / fusedopt row f's ms, for every fusedopt row of the same shape
    and dtype: how many times faster fusedopt variant f is than this provider (>1: fusedopt wins)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["shape"], row["dtype"]), []).append(row)
    for group in groups.values():
        fused = {r["provider"]: r["ms_median"] for r in group
                 if _ok(r) and r["provider"].startswith("fusedopt_")}
        for row in group:
            row["speedup"] = ({name: row["ms_median"] / ms for name, ms in fused.items()}
                              if _ok(row) else {})


def _find(rows: list[dict], shape: str, dtype: str, provider: str) -> dict | None:
    for row in rows:
        if (row["shape"], row["dtype"], row["provider"]) == (shape, dtype, provider) and _ok(row):
            return row
    return None


def check_targets(rows: list[dict]) -> list[dict]:
    """The fp32 targets of issues 3 and 4, each as {name, value, threshold, met}; met is None when
    a row it needs was not measured. Ratios are from medians; compare a miss with the rows' spread."""
    out = []

    def add(name, value, threshold, higher_is_better, note=""):
        met = None if value is None else (value >= threshold if higher_is_better else value <= threshold)
        out.append({"name": name, "value": value, "threshold": threshold, "met": met, "note": note})

    for backend in FUSEDOPT_REFERENCE_ROWS:
        for shape, want in SPEEDUP_TARGETS.items():
            fo = _find(rows, shape, "fp32", backend)
            stock = _find(rows, shape, "fp32", "stock_pipeline")
            value = stock["ms_median"] / fo["ms_median"] if fo and stock else None
            add(f"{backend} vs stock_pipeline, {shape} fp32 (x faster)", value, want, True)
        fo = _find(rows, "llama_1b", "fp32", backend)
        add(f"{backend} fraction of copy bandwidth, llama_1b fp32",
            fo["frac_copy_bw"] if fo else None, COPY_BW_TARGETS[backend], True)
        shapes = sorted({r["shape"] for r in rows if r["dtype"] == "fp32" and r["shape"] != "copy"})
        for shape in shapes:
            off = _find(rows, shape, "fp32", backend)
            on = _find(rows, shape, "fp32", backend + "_stats")
            value = on["ms_median"] / off["ms_median"] - 1.0 if off and on else None
            add(f"{backend} stats-on overhead, {shape} fp32", value, STATS_OVERHEAD_MAX, False)
    for shape, dtype in sorted({(r["shape"], r["dtype"]) for r in rows if r["shape"] != "copy"}):
        tri = _find(rows, shape, dtype, "fusedopt_triton")
        cu = _find(rows, shape, dtype, "fusedopt_cuda")
        value = cu["ms_median"] / tri["ms_median"] if tri and cu else None
        add(f"fusedopt_cuda time / fusedopt_triton time, {shape} {dtype}", value, CUDA_VS_TRITON_MAX, False)
    return out


def target_lines(targets: list[dict]) -> list[str]:
    lines = []
    for t in targets:
        verdict = {True: "MET", False: "MISSED", None: "N/A"}[t["met"]]
        value = "not measured" if t["value"] is None else f"{t['value']:.3f}"
        lines.append(f"{verdict:6s} {t['name']}: {value} (threshold {t['threshold']})")
    return lines


def _fmt(x, spec: str, missing: str = "-") -> str:
    return missing if x is None else format(x, spec)


HEADER_KEYS = ("device", "torch", "torch_cuda", "triton", "nvcc", "driver", "fusedopt_cuda_ext",
               "git_commit", "git_dirty", "date", "copy_gbps", "l2_bytes", "command")


def markdown(header: dict, rows: list[dict], targets: list[dict]) -> str:
    lines = [f"# {header.get('name', 'bench_step')}", ""]
    for key in HEADER_KEYS:
        if key in header:
            value = header[key]
            if key == "copy_gbps" and value is not None:
                value = f"{value:.0f} GB/s (device-to-device copy, bytes read + written)"
            lines.append(f"- {key}: {value}")
    for note in header.get("notes", []):
        lines.append(f"- note: {note}")
    lines += ["", "ms: median over both timed runs; run1/run2: each run's median (the spread). "
              "GB/s: fewest bytes a full fused step must move / time. "
              "xF: this provider's ms / fusedopt F's ms (>1: fusedopt is faster).", "",
              "| shape | dtype | provider | ms | p20-p80 | run1 / run2 | GB/s | % copy BW "
              "| x fusedopt_triton | x fusedopt_cuda | note |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        sp = r.get("speedup", {})
        p = f"{_fmt(r.get('ms_p20'), '.3f')}-{_fmt(r.get('ms_p80'), '.3f')}" if _ok(r) else "-"
        runs = f"{_fmt(r.get('ms_run1'), '.3f')} / {_fmt(r.get('ms_run2'), '.3f')}" if _ok(r) else "-"
        frac = r.get("frac_copy_bw")
        note = r.get("note", "") if r.get("status") == "ok" else f"{r.get('status')}: {r.get('note', '')}"
        lines.append(
            f"| {r['shape']} | {r['dtype']} | {r['provider']} | {_fmt(r.get('ms_median'), '.3f')} | {p} "
            f"| {runs} | {_fmt(r.get('gbps'), '.0f')} | {_fmt(None if frac is None else 100 * frac, '.1f')} "
            f"| {_fmt(sp.get('fusedopt_triton'), '.2f')} | {_fmt(sp.get('fusedopt_cuda'), '.2f')} "
            f"| {note.replace('|', '/')} |")
    if targets:
        lines += ["", "## Targets (fp32)", ""] + [f"- {line}" for line in target_lines(targets)]
    return "\n".join(lines) + "\n"


def write(out_dir: str, name: str, header: dict, rows: list[dict]) -> tuple[str, str]:
    """Recompute speedups and targets from all rows so far and (re)write <name>.json and <name>.md.
    Called after every row, so a run cut short by its time limit still leaves its results."""
    add_speedups(rows)
    targets = check_targets(rows)
    # Group rows by (shape, dtype) in order of first appearance: the compiled rows, measured last,
    # land next to the other rows of their shape. sorted() is stable within a group.
    first_seen: dict[tuple[str, str], int] = {}
    for row in rows:
        first_seen.setdefault((row["shape"], row["dtype"]), len(first_seen))
    rows = sorted(rows, key=lambda r: first_seen[(r["shape"], r["dtype"])])
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, f"{name}.json")
    md_path = os.path.join(out_dir, f"{name}.md")
    for path, text in ((json_path, json.dumps({"header": header, "rows": rows, "targets": targets},
                                              indent=1, sort_keys=False)),
                       (md_path, markdown(header, rows, targets))):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    return json_path, md_path
