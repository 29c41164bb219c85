"""One volume someone waits for: from the start of `segq submit` to its mask, against the engine alone.

Shared by ``bench/simulate.py --ct-latency`` and ``bench/scale_gpus.py --arms ct``. Three figures, each in one
run: **submit to mask** (the bench's clock read just before it starts the `segq submit` process, so the
interpreter's start, the imports, the checks and the job row count; the mask's job row marked done ends it),
**job row to mask** (the job's ``queued_at`` to its ``finished_at``), and the **engine alone** (one GPU running
every window, no queue). Issue 23's targets: submit to mask at most 1.3x the engine alone on one GPU, and 4 GPUs
at least 3x faster than one, from submit. `segq submit --timings` says where the submit's own seconds went.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import ROOT

TARGET_X_ENGINE = 1.3  # submit to mask, one GPU, at most this many times the engine alone
TARGET_SPEEDUP_4 = 3.0  # 4 GPUs against 1, from submit


def submit_and_wait(env: dict[str, str], scan: Path, out: Path, model: Path, name: str, timeout: float,
                    extra: tuple[str, ...] = ()) -> tuple[datetime, float, dict[str, Any]]:
    """Run `segq submit SCAN --wait --timings`: when it started (UTC), its wall seconds, and its timings."""
    argv = [sys.executable, "-m", "segq.cli", "submit", str(scan), "--out", str(out), "--model", str(model),
            "--name", name, "--wait", "--timeout", str(timeout), "--timings", *extra]
    started, clock = datetime.now(UTC), time.perf_counter()
    result = subprocess.run(argv, env={**os.environ, **env}, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - clock
    if result.returncode != 0:
        raise RuntimeError(f"segq submit {scan} failed:\n{result.stdout}\n{result.stderr}")
    return started, seconds, submit_timings(result.stderr)


def submit_timings(stderr: str) -> dict[str, Any]:
    """The ``timings {json}`` line of `segq submit --timings`, without the per-input spans; {} if absent."""
    line = next((line for line in stderr.splitlines() if line.startswith("timings ")), None)
    if line is None:
        return {}
    found = json.loads(line.removeprefix("timings "))
    found.pop("spans", None)
    return dict(found)


def run_figures(figures: dict[str, Any], timings: dict[str, Any], engine_seconds: float | None) -> dict[str, Any]:
    """One run's latency record: the timeline's figures renamed for what they are, the submit's own timings, and
    both latencies as multiples of the engine alone."""
    record = {"submit_to_mask_seconds": figures["to_last_mask_seconds"],
              "job_row_to_mask_seconds": figures["queued_to_mask_seconds"],
              "prepare_seconds": figures.get("median_prepare_seconds"),
              "inference_seconds": figures.get("median_inference_seconds"),
              "merge_seconds": figures.get("median_merge_seconds"), "parts": figures.get("parts"),
              "submit": timings}
    if engine_seconds:
        for key in ("submit_to_mask", "job_row_to_mask"):
            value = record[f"{key}_seconds"]
            record[f"{key}_x_engine"] = round(value / engine_seconds, 3) if value else None
    return record


def summary(runs: list[dict[str, Any]], engine_seconds: float | None, gpus: int) -> dict[str, Any]:
    """Medians over the timed runs (the first run warms the processes up and is left out when there are more)."""
    steady = runs[1:] or runs

    def median(key: str) -> float | None:
        values = sorted(r[key] for r in steady if r.get(key) is not None)
        return values[len(values) // 2] if values else None

    out: dict[str, Any] = {"gpus": gpus, "engine_alone_seconds": engine_seconds,
                           "submit_to_mask_seconds": median("submit_to_mask_seconds"),
                           "job_row_to_mask_seconds": median("job_row_to_mask_seconds")}
    first_prepare = sorted(r["submit"].get("prepare_sent_s") for r in steady if r["submit"].get("prepare_sent_s"))
    out["submit_to_first_prepare_seconds"] = first_prepare[len(first_prepare) // 2] if first_prepare else None
    if engine_seconds:
        for key in ("submit_to_mask", "job_row_to_mask"):
            value = out[f"{key}_seconds"]
            out[f"{key}_x_engine"] = round(value / engine_seconds, 3) if value else None
        if gpus == 1:
            out["meets_1_gpu_target"] = bool(out["submit_to_mask_x_engine"] is not None
                                             and out["submit_to_mask_x_engine"] <= TARGET_X_ENGINE)
    return out


def add_speedups(records: list[dict[str, Any]]) -> None:
    """Each record's speedup over the one with the fewest GPUs, from submit and from the job row; for 4 GPUs,
    whether it meets the 3x target."""
    base = min(records, key=lambda r: r["gpus"])
    for record in records:
        for key in ("submit_to_mask", "job_row_to_mask"):
            mine, theirs = record.get(f"{key}_seconds"), base.get(f"{key}_seconds")
            record[f"speedup_{key}_vs_{base['gpus']}_gpu"] = round(theirs / mine, 3) if mine and theirs else None
        if record["gpus"] == 4 and base["gpus"] == 1:
            speedup = record["speedup_submit_to_mask_vs_1_gpu"]
            record["meets_4_gpu_target"] = bool(speedup is not None and speedup >= TARGET_SPEEDUP_4)


def describe(record: dict[str, Any]) -> str:
    """One line a person reads: the three figures, the ratios and the speedup."""
    base = next((k for k in record if k.startswith("speedup_submit_to_mask_vs_")), None)
    speedup = f", {record[base]:.2f}x the fewest GPUs from submit" if base and record.get(base) else ""
    engine = record.get("engine_alone_seconds")
    ratios = (f" = {record['submit_to_mask_x_engine']:.2f}x / {record['job_row_to_mask_x_engine']:.2f}x the engine "
              f"alone ({engine:.2f} s)") if engine and record.get("submit_to_mask_x_engine") else ""
    return (f"{record['gpus']} GPU(s): submit to mask {record['submit_to_mask_seconds']:.2f} s, job row to mask "
            f"{record['job_row_to_mask_seconds']:.2f} s{ratios}{speedup}; first prepare message "
            f"{record.get('submit_to_first_prepare_seconds') or float('nan'):.2f} s after submit started")
