"""bench/warm_start.py in its --quick CPU mode: fresh processes start a tiny SwinUNETR's engine the way a worker
does, each step timed, the last start timing the engine on a volume, and JSON lines a start and a mode."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.common import ROOT
from bench.warm_start import compare, parse_modes


def test_modes_take_their_own_number_of_starts() -> None:
    assert parse_modes("off:2,default,regional:3", 4) == [("off", 2), ("default", 4), ("regional", 3)]


def test_the_speeds_are_compared_against_the_3_percent_target() -> None:
    assert compare({"off": 0.434, "default": 0.297, "regional": 0.304}) == {
        "regional_over_whole": 1.0236,
        "regional_within_3pct": True,
        "eager_over_regional": 1.4276,
    }
    assert compare({"default": 0.297, "regional": 0.31})["regional_within_3pct"] is False


def test_quick_cpu_run_writes_a_line_a_start_with_its_steps_and_a_summary(tmp_path: Path) -> None:
    out = tmp_path / "warm_start.jsonl"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.warm_start",
            "--quick",
            "--device",
            "cpu",
            "--modes",
            "off:2",
            "--speed-shape",
            "64",
            "64",
            "64",
            "--repeats",
            "1",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    starts = [r for r in records if r["bench"] == "warm_start"]
    assert [(r["start"], r["cache"]) for r in starts] == [(0, "cold"), (1, "warm")]
    for record in starts:
        assert record["arch"] == "SwinUNETR" and record["feature_size"] == 12 and record["device"] == "cpu"
        assert set(record["imports"]) == {"import torch", "import monai", "import segq"}
        assert {"network build", "checkpoint load", "to device"} <= set(record["steps"])
        assert 0 < record["ready_seconds"] < record["process_seconds"]
    assert starts[0]["speed"]["windows"] == 1 and starts[1]["speed"]["windows"] == 1
    (summary,) = [r for r in records if r["bench"] == "warm_start_summary"]
    assert summary["torch_compile"] == "off" and summary["speed_best_seconds"] == starts[1]["speed"]["best_seconds"]
    assert [r["bench"] for r in records][-1] == "warm_start_speeds"
    assert "===== off" in out.with_suffix(".log").read_text()
