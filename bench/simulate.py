"""Where the orchestration saturates: dozens of simulated GPUs on one CPU machine (SEGQ_BACKEND=simulate).

Each simulated GPU part sleeps for the GPU time a window takes (``--seconds-per-volume`` spread over a
small volume's windows) and writes a zero partial (worker/simulate.py), so everything else is real:
admission, prepare, the chord, merges, Redis, Celery and the SQL database. A worker process stands for
``--devices`` GPUs (threads pool); ``--workers 1,2,4`` with 16 devices each gives 16, 32 and 64 GPUs.
For each database (SQLite, PostgreSQL) and each GPU count it submits ``--volumes`` volumes at once and
measures volumes a minute, parts a second, the simulated GPUs' busy share in the steady state, and what
Redis and the database did meanwhile (commands a second, commits a second).

    python -m bench.simulate --workers 1,2,4 --devices 16 --volumes 400 --out bench/results

A GPU's share below 1 means the orchestration (or this machine's cores) could not keep it fed.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from bench import latency
from bench.common import emit, run_in_tempdir, segq, worker_process
from bench.throughput import make_model, make_volumes

logger = logging.getLogger("segq.bench.simulate")


@contextmanager
def database(kind: str, root: Path, postgres: str) -> Iterator[str]:
    """A fresh database of ``kind`` for one arm (a PostgreSQL database is dropped afterwards)."""
    if kind == "sqlite":
        yield f"sqlite:///{root / 'segq.db'}"
        return
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    admin = create_engine(postgres, isolation_level="AUTOCOMMIT")
    name = f"segq_sim_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(postgres).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"))
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


def redis_commands(url: str) -> int:
    import redis

    return int(redis.Redis.from_url(url).info("stats")["total_commands_processed"])


def db_commits(url: str) -> int | None:
    if not url.startswith("postgresql"):
        return None
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            name = make_url(url).database
            return int(conn.execute(text("SELECT xact_commit FROM pg_stat_database WHERE datname = :n"),
                                    {"n": name}).scalar() or 0)
    finally:
        engine.dispose()


def progress(url: str) -> tuple[int, int]:
    """(volumes finished, volumes in all) of the arm's database."""
    from sqlalchemy import create_engine, func, select

    from segq.models import Job, Status

    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            done = conn.execute(select(func.count()).select_from(Job).where(
                Job.status.in_([Status.DONE, Status.FAILED, Status.CANCELLED]))).scalar() or 0
            total = conn.execute(select(func.count()).select_from(Job)).scalar() or 0
            return int(done), int(total)
    finally:
        engine.dispose()


def steady_rate(url: str) -> float | None:
    """Volumes a minute between the 10th and the 90th percentile of the finish times: the sustained rate,
    without the start (workers idle while the first volumes prepare) and the tail."""
    from sqlalchemy import create_engine, select

    from segq.models import Job

    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            times = sorted(t for t in conn.execute(select(Job.finished_at)).scalars() if t is not None)
    finally:
        engine.dispose()
    lo, hi = int(len(times) * 0.1), int(len(times) * 0.9)
    if hi - lo < 2:
        return None
    span = (times[hi] - times[lo]).total_seconds()
    return round((hi - lo) / span * 60, 1) if span > 0 else None


def utilisation(url: str, devices: int) -> dict[str, Any]:
    """Busy share of the simulated GPUs in the steady state (every worker process started, none finished)."""
    from segq.timeline import load_steps, steady_window

    steps = [s for s in load_steps(None, url) if s.step == "infer"]
    window = steady_window(steps)
    if window is None:
        return {"steady_seconds": None, "gpu_busy_share": None}
    lo, hi = window
    busy = sum(max(0.0, (min(b, hi) - max(a, lo)).total_seconds())
               for a, b in ((s.busy_started_at or s.started_at, s.busy_finished_at or s.finished_at) for s in steps))
    span = (hi - lo).total_seconds()
    return {"steady_seconds": round(span, 2), "gpu_busy_share": round(busy / (span * devices), 3) if span else None}


def run_arm(args: argparse.Namespace, root: Path, kind: str, workers: int, model: Path,
            inputs: list[Path]) -> dict[str, Any]:
    import redis

    devices = workers * args.devices
    arm = root / f"{kind}-{devices}"
    arm.mkdir()
    redis.Redis.from_url(args.broker).flushdb()
    windows = 1  # the volumes are one ROI: the GPU time of a whole volume is one window's
    with database(kind, arm, args.postgres) as url, ExitStack() as stack:
        env = {"SEGQ_BROKER_URL": args.broker, "SEGQ_DATABASE_URL": url, "SEGQ_DATA_DIR": str(arm / "data"),
               "SEGQ_STORAGE": str(arm / "storage"), "SEGQ_BACKEND": "simulate", "SEGQ_PRECISION": "fp32",
               "SEGQ_SIMULATE_DEVICES": str(args.devices), "SEGQ_DEAD_WORKER_INTERVAL": "0",
               "SEGQ_SIMULATE_SECONDS_PER_WINDOW": str(args.seconds_per_volume / windows)}
        segq(env, "db", "upgrade")
        stack.enter_context(worker_process(env, "coord", arm / "coord.log", "-Q", "finish,coordinator",
                                           "-c", str(args.coordinator_concurrency)))
        for k in range(workers):
            stack.enter_context(worker_process(env, f"sim{k}", arm / f"sim{k}.log", "-Q", "gpu", "-P", "threads",
                                               "-c", str(args.devices)))
        commands, commits = redis_commands(args.broker), db_commits(url)
        started = time.perf_counter()
        segq(env, "submit", *map(str, inputs), "--out", str(arm / "masks"), "--model", str(model), "--name", "sim")
        deadline = started + args.timeout
        while (state := progress(url))[0] < len(inputs):
            if time.perf_counter() > deadline:
                raise RuntimeError(f"{kind}, {devices} simulated GPUs: {state[0]} of {len(inputs)} done after "
                                   f"{args.timeout} s")
            time.sleep(0.5)
        seconds = time.perf_counter() - started
        redis_rate = (redis_commands(args.broker) - commands) / seconds
        after = db_commits(url)
        record = {"bench": "simulate", "database": kind, "simulated_gpus": devices, "worker_processes": workers,
                  "coordinator_concurrency": args.coordinator_concurrency, "volumes": len(inputs),
                  "gpu_seconds_per_volume": args.seconds_per_volume, "seconds": round(seconds, 2),
                  "volumes_per_minute": round(len(inputs) / seconds * 60, 1),
                  "steady_volumes_per_minute": steady_rate(url),
                  "ideal_volumes_per_minute": round(devices / args.seconds_per_volume * 60, 1),
                  "redis_commands_per_second": round(redis_rate, 1),
                  "db_commits_per_second": round((after - commits) / seconds, 1) if after is not None and commits
                  is not None else None, "cpus": os.cpu_count(), **utilisation(url, devices)}
    return record


def ct_model(directory: Path, roi: int) -> Path:
    """A tiny network's model.toml with ROI ``roi`` and z-score preprocessing (never run: the parts sleep)."""
    import torch

    from segq.modelspec import ModelSpec
    from segq.pipeline.toml import write_model_toml
    from worker.engines.model import build_network

    directory.mkdir(parents=True, exist_ok=True)
    spec = ModelSpec("UNet", 1, 2, roi, 1, checkpoint=directory / "model.pt", feature_size=4, sw_batch_size=16,
                     preprocess="zscore")
    torch.manual_seed(0)
    torch.save(build_network(spec).state_dict(), spec.checkpoint)
    write_model_toml(directory / "model.toml", spec)
    return directory / "model.toml"


def ct_arm(args: argparse.Namespace, root: Path, devices: int, model: Path, scans: list[Path]) -> dict[str, Any]:
    """One CT-size volume at a time on ``devices`` simulated GPUs: submit to mask, job row to mask, and where the
    time went (bench/latency.py).

    The parts sleep ``--ct-gpu-seconds`` spread over the volume's windows; `segq submit`, prepare, the chord, the
    merge, Redis and SQLite are real, on this machine's cores. The first scan warms the processes up (imports, the
    checkpoint check, first touch of memory); each scan is a new volume, since a repeat of one would be copied from
    the first's mask.
    """
    import redis

    from bench.scale_gpus import timeline_figures

    arm = root / f"ct-{devices}"
    arm.mkdir()
    redis.Redis.from_url(args.broker).flushdb()
    windows = args.ct_windows
    env = {"SEGQ_BROKER_URL": args.broker, "SEGQ_DATABASE_URL": f"sqlite:///{arm / 'segq.db'}",
           "SEGQ_DATA_DIR": str(arm / "data"), "SEGQ_STORAGE": str(arm / "storage"), "SEGQ_BACKEND": "simulate",
           "SEGQ_PRECISION": "fp32", "SEGQ_SIMULATE_DEVICES": str(devices), "SEGQ_DEAD_WORKER_INTERVAL": "0",
           "SEGQ_SIMULATE_SECONDS_PER_WINDOW": str(args.ct_gpu_seconds / windows)}
    runs = []
    with ExitStack() as stack:
        segq(env, "db", "upgrade")
        stack.enter_context(worker_process(env, "coord", arm / "coord.log", "-Q", "finish,coordinator",
                                           "-c", str(args.coordinator_concurrency)))
        stack.enter_context(worker_process(env, "sim", arm / "sim.log", "-Q", "gpu", "-P", "threads",
                                           "-c", str(devices)))
        for k, scan in enumerate(scans):
            name = f"ct{k}"
            submitted, _seconds, timings = latency.submit_and_wait(env, scan, arm / name, model, name, args.timeout)
            figures = timeline_figures(env, name, submitted)
            if figures["parts"] == 0 or figures["queued_to_mask_seconds"] is None:
                raise RuntimeError(f"{name} on {devices} simulated GPUs did not finish: see {arm}")
            runs.append(project(latency.run_figures(figures, timings, args.ct_gpu_seconds), args.host_costs))
    record = {"bench": "simulate ct latency", "simulated_gpus": devices, "ct_gpu_seconds": args.ct_gpu_seconds,
              "windows": windows, "cpus": os.cpu_count(), "label": args.label,
              **latency.summary(runs, args.ct_gpu_seconds, devices), "runs": runs}
    projected = sorted(r["projected_submit_to_mask_seconds"] for r in (runs[1:] or runs))
    record["projected_submit_to_mask_seconds"] = projected[len(projected) // 2]
    record["projected_submit_to_mask_x_engine"] = round(record["projected_submit_to_mask_seconds"]
                                                        / args.ct_gpu_seconds, 3)
    record["median_queued_to_mask_seconds"] = record["job_row_to_mask_seconds"]  # the name earlier lines used
    return record


def project(run: dict[str, Any], host_costs: tuple[float, float, float]) -> dict[str, Any]:
    """The run with this machine's prepare and merge replaced by ``host_costs`` (prepare, part host side, merge,
    measured on the H200 host's 16 cores): where both lie whole on the volume's path, as they do while parts wait
    for the whole prepare and merge for every part, its submit-to-mask there. An estimate, named as such."""
    prepare, _part, merge = host_costs
    saved = (run["prepare_seconds"] or 0.0) - prepare + (run["merge_seconds"] or 0.0) - merge
    return {**run, "projected_submit_to_mask_seconds": round(run["submit_to_mask_seconds"] - saved, 3)}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="1,2,4", help="Simulated GPU worker processes per arm.")
    parser.add_argument("--devices", type=int, default=16, help="Simulated GPUs per worker process.")
    parser.add_argument("--databases", default="sqlite,postgres")
    parser.add_argument("--volumes", type=int, default=400)
    parser.add_argument("--seconds-per-volume", type=float, default=0.46,
                        help="GPU seconds a volume takes (0.46: BraTS-size, SwinUNETR fp16 on an H200).")
    parser.add_argument("--coordinator-concurrency", type=int, default=2)
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/10", help="A Redis database this run may flush.")
    parser.add_argument("--postgres", default="postgresql+psycopg2://postgres@127.0.0.1:5432/test",
                        help="A PostgreSQL server where the run may create and drop databases.")
    parser.add_argument("--ct-latency", default="", help="Instead: one CT-size volume's latency on these "
                        "simulated GPU counts (e.g. 1,4), each after a warm-up volume.")
    parser.add_argument("--ct-gpu-seconds", type=float, default=3.93,
                        help="GPU seconds of the whole CT-size volume: the engine alone (3.93: SwinUNETR fs48 fp16, "
                        "compiled, 600 windows on an H200; 5.64 eager).")
    parser.add_argument("--host-costs", type=lambda text: tuple(float(v) for v in text.split(",")),
                        default=(1.15, 0.16, 0.33), help="A CT's prepare, part host side and merge seconds on the "
                        "H200 host's 16 cores (bench/volume_costs.py), for the projected figure.")
    parser.add_argument("--ct-windows", type=int, default=600, help="Windows of the CT-size volume (600: 512x512x300, "
                        "ROI 96, overlap 0.5).")
    parser.add_argument("--ct-repeats", type=int, default=3, help="Timed CT volumes per GPU count, after the warm-up.")
    parser.add_argument("--label", default="", help="Recorded with each CT latency line (a commit, a machine).")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="Directory for simulate.jsonl.")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    run_in_tempdir("segq-simulate-", run, parse_args(argv), logger)


def run(args: argparse.Namespace, root: Path) -> None:
    if args.ct_latency:
        return run_ct(args, root)
    model = make_model(root / "model", "UNet", 4, 32, 1)
    inputs = make_volumes(root / "scans", args.volumes, (32, 32, 32))
    out = args.out / "simulate.jsonl" if args.out else None
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for kind in args.databases.split(","):
        for workers in (int(w) for w in args.workers.split(",")):
            results.append(run_arm(args, root, kind, workers, model, inputs))
            emit(results[-1], out)
    for r in results:
        print(f"{r['database']:>8} {r['simulated_gpus']:3d} simulated GPUs: {r['steady_volumes_per_minute']} "
              f"volumes/min sustained (ideal {r['ideal_volumes_per_minute']:.0f}), GPU busy {r['gpu_busy_share']}, "
              f"Redis {r['redis_commands_per_second']:.0f} cmd/s, DB {r['db_commits_per_second']} commits/s")


def run_ct(args: argparse.Namespace, root: Path) -> None:
    from bench import peer_folder

    scans = peer_folder.make_volumes(root / "ct-scans", args.ct_repeats + 1, (512, 512, 300), seed=7, dtype="int16",
                                     prefix="ct")
    model = ct_model(root / "model", 96)
    out = args.out / "simulate_ct.jsonl" if args.out else None
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for devices in (int(d) for d in args.ct_latency.split(",")):
        results.append(ct_arm(args, root, devices, model, scans))
        emit(results[-1], None)
    latency.add_speedups(results)
    for r in results:
        emit(r, out)
    for r in results:
        print(f"simulated {latency.describe(r)}; projected with the H200 host's costs "
              f"{r['projected_submit_to_mask_seconds']:.2f} s ({r['projected_submit_to_mask_x_engine']:.2f}x)")


if __name__ == "__main__":
    main()
