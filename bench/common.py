"""Shared pieces of the benchmarks: a throwaway deployment (Redis DB, SQLite, storage) and timing."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# The volumes the GPU benchmarks run (bench/gpu_engines.py, bench/gpu_queue.py): shape and overlap.
VOLUMES = {"brats": ((240, 240, 155), 0.5), "ct": ((512, 512, 300), 0.25)}
QUICK_VOLUMES = {"brats": ((80, 72, 60), 0.5), "ct": ((120, 100, 70), 0.25)}


def deployment_env(root: Path, broker: str) -> dict[str, str]:
    return {
        "SEGQ_BROKER_URL": broker,
        "SEGQ_DATABASE_URL": f"sqlite:///{root / 'segq.db'}",
        "SEGQ_DATA_DIR": str(root / "data"),
        "SEGQ_STORAGE": str(root / "storage"),
    }


@contextmanager
def worker_process(env: dict[str, str], name: str, log: Path, *extra: str) -> Iterator[subprocess.Popen[bytes]]:
    """A real `segq worker` for the length of the block; stopped (warm shutdown) afterwards."""
    with open(log, "ab") as handle:
        proc = subprocess.Popen([sys.executable, "-m", "segq.cli", "worker", "-n", f"{name}@%h", *extra],
                                env={**os.environ, **env}, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while " ready." not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker {name} did not start:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.2)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def segq(env: dict[str, str], *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "segq.cli", *args], env={**os.environ, **env}, cwd=ROOT,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"segq {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout


def run_in_tempdir(prefix: str, run: Any, args: Any, logger: Any) -> None:
    """Run ``run(args, root)`` in a fresh temp directory, removed afterwards unless ``args.keep``."""
    import logging
    import shutil
    import tempfile

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        run(args, root)
    finally:
        if getattr(args, "keep", False):
            logger.info("kept the volumes, databases and worker logs in %s", root)
        else:
            shutil.rmtree(root, ignore_errors=True)


def summary(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def emit(record: dict[str, Any], out: Path | None) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    if out is not None:
        with open(out, "a") as handle:
            handle.write(line + "\n")
