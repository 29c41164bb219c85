"""Throughput with 1 and 2 CPU workers: cases per hour and subtasks per second on one volume set, in one run.

Each arm is a real `segq worker --gpus none -c K` launcher (K worker processes on the gpu queues plus
the coordinator process) on a deployment of its own (Redis database flushed, SQLite, storage), so no
arm reuses another's masks. Every worker first runs a warm-up volume cut into one-window subtasks (it
loads torch and the model), then the set is submitted at once and timed from submit to the last mask.
Arms alternate when --repeats > 1. The ratio is K workers over one.

    python -m bench.throughput --volumes 6 --out bench/results
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import ROOT, deployment_env, emit, run_in_tempdir, segq

logger = logging.getLogger("segq.bench.throughput")


def make_model(directory: Path, arch: str, feature_size: int, roi: int, sw_batch_size: int) -> Path:
    """A randomly initialised network (checkpoint + model.toml); built on the CPU, so no CUDA here."""
    import torch

    from segq.modelspec import ModelSpec
    from segq.pipeline.toml import write_model_toml
    from worker.engines.model import build_network

    directory.mkdir(parents=True, exist_ok=True)
    spec = ModelSpec(arch, 1, 2, roi, 1, checkpoint=directory / "model.pt", feature_size=feature_size,
                     sw_batch_size=sw_batch_size)
    torch.manual_seed(0)
    torch.save(build_network(spec).state_dict(), spec.checkpoint)
    write_model_toml(directory / "model.toml", spec)
    return directory / "model.toml"


def add_network_arguments(parser: argparse.ArgumentParser, arch: str, feature_size: int, roi: int,
                          sw_batch_size: int, sw_batch_help: str | None = None) -> None:
    """The options of the randomly initialised network a benchmark builds (see :func:`network_model`)."""
    parser.add_argument("--arch", default=arch)
    parser.add_argument("--feature-size", type=int, default=feature_size)
    parser.add_argument("--roi", type=int, default=roi)
    parser.add_argument("--sw-batch-size", type=int, default=sw_batch_size, help=sw_batch_help)


def network_model(args: argparse.Namespace, root: Path) -> Path:
    """``--model`` when the benchmark has it and it is given, else a random network from the options above."""
    given: Path | None = getattr(args, "model", None)
    return given or make_model(root / "model", args.arch, args.feature_size, args.roi, args.sw_batch_size)


def make_volumes(directory: Path, count: int, shape: Sequence[int], seed: int = 0) -> list[Path]:
    """``count`` random volumes (uncompressed .nii: the benchmark is about the queue, not gzip)."""
    import nibabel as nib

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = directory / f"case{i:03d}.nii"
        nib.save(nib.Nifti1Image(rng.normal(size=tuple(shape)).astype(np.float32), np.diag([1, 1, 2, 1.0])),
                 str(path))
        paths.append(path)
    return paths


@contextmanager
def launched(env: dict[str, str], log: Path, args: Sequence[str], ready: int,
             timeout: float = 300) -> Iterator[subprocess.Popen[bytes]]:
    """`segq worker <args>` (the launcher) until the block ends; then a warm shutdown, a kill if it hangs."""
    with open(log, "ab") as handle:
        proc = subprocess.Popen([sys.executable, "-m", "segq.cli", "worker", *args], env={**os.environ, **env},
                                stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while log.read_text(errors="replace").count(" ready.") < ready:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"workers did not start ({' '.join(args)}):\n"
                                   f"{log.read_text(errors='replace')[-4000:]}")
            time.sleep(0.3)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


def run_set(env: dict[str, str], inputs: Sequence[Path], out: Path, model: Path, name: str,
            max_windows: int, timeout: float, extra: Sequence[str] = ()) -> tuple[float, list[dict[str, Any]]]:
    """Submit every input as one dataset and wait; the wall seconds and the result rows."""
    started = time.perf_counter()
    segq(env, "submit", *map(str, inputs), "--out", str(out), "--model", str(model), "--name", name, "--wait",
         "--timeout", str(timeout), "--max-windows-per-subtask", str(max_windows), *extra)
    seconds = time.perf_counter() - started
    rows = json.loads(segq(env, "results", name, "--format", "json"))
    failed = [r for r in rows if r["status"] != "done"]
    if failed:
        raise RuntimeError(f"{len(failed)} volume(s) of {name} did not finish: {failed[0].get('error')}")
    return seconds, rows


def run_arm(root: Path, broker: str, worker_args: Sequence[str], ready: int, label: str, model: Path,
            warmup: Path, inputs: Sequence[Path], max_windows: int, timeout: float,
            extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    """One arm on a fresh deployment: start the workers, warm every one up, time the set."""
    import redis

    redis.Redis.from_url(broker).flushdb()
    env = {**deployment_env(root, broker), **(extra_env or {})}
    with launched(env, root / "workers.log", worker_args, ready):
        run_set(env, [warmup], root / "warmup", model, "warmup", 1, timeout)
        seconds, rows = run_set(env, inputs, root / "masks", model, "set", max_windows, timeout)
    subtasks = sum(int(r["subtasks"]) for r in rows)
    workers = sorted({w for r in rows for w in str(r["workers"]).split(",") if w})
    return {"arm": label, "volumes": len(rows), "subtasks": subtasks, "seconds": round(seconds, 3),
            "cases_per_hour": round(len(rows) / seconds * 3600, 1),
            "subtasks_per_second": round(subtasks / seconds, 3), "workers": workers}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="1,2", help="CPU worker counts to compare (default 1,2).")
    parser.add_argument("--volumes", type=int, default=6)
    parser.add_argument("--shape", type=int, nargs=3, default=(64, 64, 48))
    add_network_arguments(parser, "UNet", 8, 32, 4)
    parser.add_argument("--max-windows-per-subtask", type=int, default=4)
    parser.add_argument("--model", type=Path, default=None, help="A model.toml to use instead of a random network.")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/11", help="A Redis database this run may flush.")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--keep", action="store_true", help="Keep the work directory (volumes, worker logs).")
    parser.add_argument("--out", type=Path, default=None, help="Directory for throughput.jsonl.")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    run_in_tempdir("segq-throughput-", run, parse_args(argv), logger)


def run(args: argparse.Namespace, root: Path) -> None:
    counts = [int(c) for c in args.workers.split(",")]
    model = network_model(args, root)
    inputs = make_volumes(root / "scans", args.volumes, args.shape)
    warmup = make_volumes(root / "warmup-scan", 1, args.shape, seed=99)[0]
    out = args.out / "throughput.jsonl" if args.out else None
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    results: dict[int, list[dict[str, Any]]] = {k: [] for k in counts}
    for repeat in range(args.repeats):
        for k in counts if repeat % 2 == 0 else counts[::-1]:
            arm_root = root / f"r{repeat}-w{k}"
            arm_root.mkdir()
            logger.info("repeat %d: %d CPU worker(s)", repeat, k)
            result = run_arm(arm_root, args.broker, ["--gpus", "none", "-c", str(k), "-n", f"bench{k}"], k + 1,
                             f"{k} cpu", model, warmup, inputs, args.max_windows_per_subtask, args.timeout)
            results[k].append(result)
    base = float(np.median([r["cases_per_hour"] for r in results[counts[0]]]))
    for k in counts:
        median = float(np.median([r["cases_per_hour"] for r in results[k]]))
        record = {"bench": "throughput", "machine": "cpu", "cpus": os.cpu_count(), "cpu_workers": k,
                  "shape": list(args.shape), "arch": args.arch, "feature_size": args.feature_size, "roi": args.roi,
                  "max_windows_per_subtask": args.max_windows_per_subtask, "runs": results[k],
                  "cases_per_hour": median,
                  "subtasks_per_second": float(np.median([r["subtasks_per_second"] for r in results[k]])),
                  f"ratio_vs_{counts[0]}": round(median / base, 3)}
        emit(record, out)
    for k in counts:
        chp = float(np.median([r["cases_per_hour"] for r in results[k]]))
        sps = float(np.median([r["subtasks_per_second"] for r in results[k]]))
        print(f"{k} CPU worker(s): {chp:8.1f} cases/hour  {sps:6.2f} subtasks/s  ratio vs {counts[0]}: "
              f"{chp / base:.2f}")


if __name__ == "__main__":
    main()
