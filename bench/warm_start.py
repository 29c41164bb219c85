"""A worker's engine start, step by step, cold and from the cache, and the engine's speed, for each compile mode.

Each start is a fresh process that starts its engine the way a worker does (``worker.runtime.engine_for``): the
imports, CUDA's start, the network built and its checkpoint loaded, the compile, the first call (where
torch.compile compiles) and the accuracy gate. Each mode gets an empty engine directory (inductor's cache and the
gate's kept verdicts and fp32 reference live in it), so its first start is the cold one, what a new machine pays,
and the later ones are what every worker start costs after. The first and the last start of each mode also time
the engine on a BraTS-size volume (240x240x155), so the modes' speeds come from one run (and a mode whose warm
starts --budget skipped still has one).

On the GPU (SwinUNETR fs48 fp16, ROI batch 16): eager fp16, the whole network compiled, the regional compile:

    python -m bench.warm_start --modes regional:3,off:1,default:2 --compile-profile --budget 400 \\
        --out "$OUT/warm_start_h200.jsonl"

On a CPU, a tiny SwinUNETR (what tests/unit/test_bench_warm_start.py runs):

    python -m bench.warm_start --quick --device cpu --out /tmp/warm_start.jsonl

JSON lines go to --out: one a start (process seconds, "ready" seconds, the steps, the gate and how its verdict
was reached, the speed), then one summary a mode and one comparing the modes' speeds. The starts' own logs go to
<out>.log. Every start records dynamo's compile_times (its top entries); ``--compile-profile`` runs the
whole-network mode's warm starts with TORCH_LOGS and prints those entries, and ``--cprofile`` adds cProfile's top
entries for its last one: where a compile from inductor's cache spends its time.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import ROOT, emit, run_in_tempdir

logger = logging.getLogger("segq.bench.warm_start")
RESULT = "WARM_START_RESULT "  # the prefix of the child's one JSON line on stdout
MODES = {"off": "eager", "default": "whole network compiled", "regional": "regional compile", "auto": "auto"}
TORCH_LOGS = "graph_breaks,recompiles,perf_hints"


def parse_modes(text: str, starts: int) -> list[tuple[str, int]]:
    """``off:2,default,regional:3`` -> [("off", 2), ("default", starts), ("regional", 3)]."""
    modes = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, count = item.partition(":")
        modes.append((name, int(count) if count else starts))
    if not modes or any(count < 1 for _, count in modes):
        raise argparse.ArgumentTypeError(f"--modes {text!r}: give MODE[:STARTS],... with at least one start each")
    return modes


# --- the child: one start, in a fresh process ------------------------------------------------------------------


def child(args: argparse.Namespace) -> None:
    """One engine start as a worker makes it; prints one JSON line (RESULT) with its steps."""
    began = time.perf_counter()
    import torch

    after_torch = time.perf_counter()
    import monai  # noqa: F401  (timed: a worker imports it with the network)

    after_monai = time.perf_counter()
    from segq.pipeline import load_pipeline
    from segq.settings import get_settings
    from worker import runtime

    imports = {
        "import torch": after_torch - began,
        "import monai": after_monai - after_torch,
        "import segq": time.perf_counter() - after_monai,
    }
    settings = get_settings()
    spec = load_pipeline(args.model)
    sha = spec.checksum()
    profiler = _profiler(args.cprofile)
    spec, engine = runtime.engine_for(spec.to_dict(), sha, settings)
    ready = time.perf_counter() - began
    if profiler is not None:
        profiler.disable()
    clock = runtime.last_start(sha, settings, spec.sw_batch_size)
    record: dict[str, Any] = {
        "imports": {k: round(v, 3) for k, v in imports.items()},
        "ready_seconds": round(ready, 3),
        "steps": clock.as_dict() if clock else {},
        "compile_mode": getattr(engine, "compile_mode", None),
        "torch": torch.__version__,
        "device": _device_name(engine.device),
    }
    if args.speed:
        record["speed"] = speed(engine, spec, tuple(args.speed_shape), args.repeats)
    record["compile_times"] = top_compile_times(args.top)
    if profiler is not None:
        _print_profile(profiler, args.top)
    print(RESULT + json.dumps(record), flush=True)


def _profiler(enabled: bool) -> Any:
    if not enabled:
        return None
    import cProfile

    profiler = cProfile.Profile()
    profiler.enable()
    return profiler


def _print_profile(profiler: Any, top: int) -> None:
    import io
    import pstats

    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(top)
    print(f"cProfile, engine start, top {top} by cumulative time:\n{text.getvalue()}", flush=True)


def _device_name(device: Any) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def top_compile_times(top: int) -> list[dict[str, Any]]:
    """Dynamo's compile timers (``torch._dynamo.utils.compile_times``), largest total first."""
    try:
        from torch._dynamo.utils import compilation_time_metrics
    except ImportError:
        return []
    rows = [
        {"what": name, "seconds": round(sum(values), 3), "calls": len(values)}
        for name, values in compilation_time_metrics.items()
        if values
    ]
    return sorted(rows, key=lambda row: -row["seconds"])[:top]


def speed(engine: Any, spec: Any, shape: tuple[int, int, int], repeats: int) -> dict[str, Any]:
    """The engine alone over a volume of ``shape`` (the slab loop a part runs), best and median of ``repeats``."""
    import numpy as np

    from segq.tiling import Slab, importance_map, pad_volume, plan_windows
    from worker.engines.inference import read_slab, slab_partial

    volume = np.random.default_rng(0).standard_normal((spec.in_channels, *shape)).astype(np.float32)
    plan = plan_windows(shape, spec.roi, spec.overlap, spec.mode)
    padded = pad_volume(volume, plan)
    slab = Slab(0, list(plan.starts), 0, plan.padded_shape[0])
    weights = importance_map(plan)
    times = []
    for _ in range(repeats + 1):  # the first pays first-touch memory
        _sync(engine.device)
        started = time.perf_counter()
        slab_partial(
            read_slab(padded, slab, engine.device),
            slab,
            padded.shape[2:],
            plan.roi,
            weights,
            engine,
            spec.sw_batch_size,
        ).cpu()
        _sync(engine.device)
        times.append(time.perf_counter() - started)
    return {
        "shape": list(shape),
        "windows": len(plan.starts),
        "best_seconds": round(min(times[1:]), 4),
        "median_seconds": round(statistics.median(times[1:]), 4),
    }


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- the parent: the starts, in order, and their summaries -----------------------------------------------------


def start(
    args: argparse.Namespace, model: Path, mode: str, engines: Path, log: Path, timed_speed: bool, profile: str = ""
) -> dict[str, Any]:
    """One start in a fresh process: its wall time and the child's record. ``profile``: "logs" sets TORCH_LOGS,
    "cprofile" also runs the start under cProfile."""
    env = {
        **os.environ,
        "SEGQ_ENGINE_DIR": str(engines),
        "SEGQ_PRECISION": args.precision,
        "SEGQ_TORCH_COMPILE": mode,
        "SEGQ_DEVICE": args.device,
        "SEGQ_BACKEND": "torch",
        "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0"),
    }
    env.pop("SEGQ_INDUCTOR_CACHE_DIR", None)  # inductor's cache goes under SEGQ_ENGINE_DIR, as in a worker
    if profile:
        env["TORCH_LOGS"] = args.torch_logs
    argv = [sys.executable, "-m", "bench.warm_start", "--child", "--model", str(model), "--top", str(args.top)]
    argv += ["--repeats", str(args.repeats), "--speed-shape", *map(str, args.speed_shape)]
    argv += ["--speed"] if timed_speed else []
    argv += ["--cprofile"] if profile == "cprofile" else []
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - started
    with open(log, "a") as handle:
        handle.write(f"===== {mode} ({profile or 'plain'}) exit {done.returncode} =====\n{done.stdout}{done.stderr}\n")
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
    if done.returncode != 0 or not lines:
        tail = "\n".join(done.stderr.splitlines()[-15:])
        raise SystemExit(f"the {mode} start failed with exit {done.returncode}; see {log}:\n{tail}")
    return {"process_seconds": round(wall, 2), **json.loads(lines[-1][len(RESULT) :])}


def run(args: argparse.Namespace, root: Path) -> None:
    from bench.throughput import network_model
    from segq.pipeline.toml import load_model_spec

    began = time.perf_counter()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    log = args.out.with_suffix(".log")
    model = network_model(args, root)
    spec = load_model_spec(model)
    network = {
        "arch": spec.arch,
        "feature_size": spec.feature_size,
        "roi": spec.roi_size,
        "sw_batch_size": spec.sw_batch_size,
        "precision": args.precision,
    }
    speeds: dict[str, float] = {}
    for mode, starts in args.modes:
        engines = (args.engine_dir or root) / f"engines-{mode}"  # empty: the first start is this machine's first
        if engines.exists() and any(engines.iterdir()):
            raise SystemExit(f"{engines} is not empty: the first start would not be a cold one")
        records = []
        for number in range(starts):
            if args.budget is not None and time.perf_counter() - began > args.budget:
                emit(
                    {"bench": "warm_start", **network, "torch_compile": mode, "start": number, "skipped": "budget"},
                    args.out,
                )
                print(f"{mode} start {number} skipped: past --budget {args.budget} s", flush=True)
                break
            profile = _profile_of(args, mode, number, starts)
            figures = start(args, model, mode, engines, log, timed_speed=number in (0, starts - 1), profile=profile)
            cache = "cold" if number == 0 else "warm"
            record = {"bench": "warm_start", **network, "torch_compile": mode, "start": number, "cache": cache}
            record.update(profile=profile or None, **figures)
            emit(record, args.out)
            records.append(record)
            _say(record)
            if profile:
                _print_compile_times(mode, figures["compile_times"])
        if records:
            summary = summarise(mode, records)
            emit({"bench": "warm_start_summary", **network, **summary}, args.out)
            if summary.get("speed_best_seconds") is not None:
                speeds[mode] = summary["speed_best_seconds"]
    if speeds:
        emit({"bench": "warm_start_speeds", **network, "best_seconds": speeds, **compare(speeds)}, args.out)


def _profile_of(args: argparse.Namespace, mode: str, number: int, starts: int) -> str:
    """The whole-network mode's warm starts run with TORCH_LOGS under --compile-profile; its last one also under
    cProfile with --cprofile (which slows it: its times are then not a plain start's)."""
    if not args.compile_profile or mode != "default" or number == 0:
        return ""
    return "cprofile" if args.cprofile and number == starts - 1 else "logs"


def _print_compile_times(mode: str, rows: list[dict[str, Any]]) -> None:
    print(f"{mode}, compile from the cache: dynamo's compile_times, top entries:", flush=True)
    for row in rows:
        print(f"  {row['seconds']:9.2f} s  {row['calls']:4d}x  {row['what']}", flush=True)


def summarise(mode: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    """A mode's cold start, its warm starts' median, its speed and its gate's verdicts."""
    warm = [r["ready_seconds"] for r in records[1:]]
    last = records[-1]
    return {
        "torch_compile": mode,
        "what": MODES.get(mode, mode),
        "compile_mode": last.get("compile_mode"),
        "cold_ready_seconds": records[0]["ready_seconds"],
        "cold_process_seconds": records[0]["process_seconds"],
        "warm_ready_median_seconds": round(statistics.median(warm), 2) if warm else None,
        "warm_process_median_seconds": round(statistics.median(r["process_seconds"] for r in records[1:]), 2)
        if warm
        else None,
        "gate": [r["steps"].get("gate_verdict") for r in records],
        "gate_dice": last["steps"].get("gate_dice"),
        "speed_best_seconds": next((r["speed"]["best_seconds"] for r in reversed(records) if r.get("speed")), None),
    }


def compare(speeds: dict[str, float]) -> dict[str, Any]:
    """The regional compile's speed against the whole network's (the target: within 3%) and against eager."""
    out: dict[str, Any] = {}
    if "regional" in speeds and "default" in speeds:
        ratio = speeds["regional"] / speeds["default"]
        out.update(regional_over_whole=round(ratio, 4), regional_within_3pct=ratio <= 1.03)
    if "regional" in speeds and "off" in speeds:
        out["eager_over_regional"] = round(speeds["off"] / speeds["regional"], 4)
    return out


def _say(record: dict[str, Any]) -> None:
    steps = ", ".join(f"{k} {v}" for k, v in record["steps"].items())
    speed_text = f"; {record['speed']['best_seconds']} s a volume" if record.get("speed") else ""
    print(
        f"{record['torch_compile']:>9} start {record['start']} ({record['cache']}): process "
        f"{record['process_seconds']:6.1f} s, ready {record['ready_seconds']:6.1f} s [{steps}]{speed_text}",
        flush=True,
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from bench.throughput import add_network_arguments

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_network_arguments(parser, "SwinUNETR", 48, 96, 16)
    parser.add_argument("--precision", default="fp16", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--device", default="cuda:0", help="SEGQ_DEVICE of the starts: cuda:0, or cpu.")
    parser.add_argument(
        "--modes",
        "--torch-compile",
        dest="modes",
        default="off:2,default:2,regional:3",
        help="SEGQ_TORCH_COMPILE values with their starts, MODE[:STARTS],...; each mode gets an "
        "empty engine directory, so its first start is a cold one.",
    )
    parser.add_argument("--starts", type=int, default=3, help="Starts of a mode that --modes gives no count.")
    parser.add_argument(
        "--speed-shape",
        type=int,
        nargs=3,
        default=[240, 240, 155],
        help="The volume the last start of each mode times the engine on (default: BraTS-size).",
    )
    parser.add_argument("--repeats", type=int, default=3, help="Timed passes over that volume.")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="A tiny SwinUNETR (feature_size 12, ROI 64, batch 2) in fp32 on a small volume: the "
        "CPU test's settings (modes off and regional unless --modes is given).",
    )
    parser.add_argument(
        "--compile-profile",
        action="store_true",
        help="The whole-network mode's (default) warm starts run with TORCH_LOGS, and dynamo's compile_times of each "
        "are printed: where its compile from the cache spends its time.",
    )
    parser.add_argument("--torch-logs", default=TORCH_LOGS, help="TORCH_LOGS of the --compile-profile start.")
    parser.add_argument("--top", type=int, default=25, help="Entries of compile_times and cProfile to keep.")
    parser.add_argument("--model", type=Path, default=None, help="A model.toml to use instead of a random network.")
    parser.add_argument(
        "--engine-dir",
        type=Path,
        default=None,
        help="Keep each mode's engine directory here (engines-<mode>); default: a temporary one.",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON lines file (a directory: <out>/warm_start.jsonl); logs: <out>.log."
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--speed", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--cprofile",
        action="store_true",
        help="With --compile-profile: the whole-network mode's last warm start also runs under cProfile (slower) and "
        "prints cProfile's top entries; in a start process, run it under cProfile.",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="Seconds after which no new start begins (the run stays inside a device call's limit).",
    )
    args = parser.parse_args(argv)
    if args.child:
        return args
    if args.out is None:
        parser.error("--out is required")
    if args.out.is_dir():
        args.out = args.out / "warm_start.jsonl"
    if args.quick:
        given = set(argv or sys.argv[1:])
        args.feature_size, args.roi, args.sw_batch_size = 12, 64, 2
        if not any(flag.startswith("--precision") for flag in given):
            args.precision = "fp32"
        if not any(flag.startswith("--speed-shape") for flag in given):
            args.speed_shape = [80, 80, 64]
        if not any(flag.startswith("--modes") for flag in given):
            args.modes = "off:2,regional:2"
    args.modes = parse_modes(args.modes, args.starts)
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child(args)
        return
    run_in_tempdir("segq-warm-", run, args, logger)


if __name__ == "__main__":
    main()
