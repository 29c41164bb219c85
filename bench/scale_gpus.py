"""Scaling over GPUs: cases per hour and subtasks per second with 1..N GPU workers, in one run.

One command for a GPU machine: it starts a Redis server (``--redis-server``, e.g. .whl/redis/redis-server
from /work/shared/device/redis.sh; or uses ``--broker``), then for each GPU count runs a real launcher
(`segq worker --gpus N`: one worker process per GPU plus the coordinator process) on a deployment of its
own (Redis database flushed, SQLite, storage), warms every worker up (torch, CUDA context, engine) with
a volume cut into one-window subtasks, submits the volume set at once and times it to the last mask.
Works for any N, 1 included; arms default to 1, 2, 4 … up to the GPUs present.

    python -m bench.scale_gpus --redis-server .whl/redis/redis-server --out "$OUT"

JSON lines go to <out>/scale_gpus.jsonl; speedup and efficiency are against the first arm. This process
never initialises CUDA (the random network is built on the CPU); only the workers do.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.common import emit, run_in_tempdir
from bench.throughput import add_network_arguments, make_volumes, network_model, run_arm
from segq.settings import get_settings
from worker.launcher import count_gpus, visible_devices

logger = logging.getLogger("segq.bench.scale_gpus")


def default_arms(available: int) -> list[int]:
    """1, 2, 4 … and the count itself: 8 GPUs give 1,2,4,8; 6 give 1,2,4,6; 1 gives 1."""
    if available < 1:
        raise SystemExit("no GPU visible (nvidia-smi -L): this benchmark is for a GPU machine; "
                         "bench/throughput.py compares CPU workers")
    arms = [1]
    while arms[-1] * 2 <= available:
        arms.append(arms[-1] * 2)
    return arms if arms[-1] == available else [*arms, available]


def gpu_names() -> list[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=60).stdout
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


@contextmanager
def redis_server(binary: Path | None, port: int, broker: str, workdir: Path) -> Iterator[str]:
    """A Redis server of our own for the run (stopped afterwards), or the given broker when no binary is named."""
    if binary is None:
        yield broker
        return
    import redis

    env = {**os.environ, "LD_LIBRARY_PATH": f"{binary.resolve().parent}:{os.environ.get('LD_LIBRARY_PATH', '')}"}
    log = open(workdir / "redis.log", "ab")  # noqa: SIM115 (closed in finally, after the server stops)
    proc = subprocess.Popen([str(binary), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(workdir)], env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                redis.Redis.from_url(url, socket_connect_timeout=1).ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start:\n{(workdir / 'redis.log').read_text()}") from None
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", default=None, help="GPU counts to compare, e.g. 1,2,4 (default: 1, 2, 4 … N).")
    parser.add_argument("--redis-server", type=Path, default=None, help="Start this redis-server binary.")
    parser.add_argument("--redis-port", type=int, default=6390)
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/11",
                        help="Without --redis-server: a Redis database this run may flush.")
    parser.add_argument("--volumes", type=int, default=16)
    parser.add_argument("--shape", type=int, nargs=3, default=(240, 240, 155))
    add_network_arguments(parser, "SwinUNETR", 48, 96, 8)
    parser.add_argument("--max-windows-per-subtask", type=int, default=8)
    parser.add_argument("--precision", default="fp16", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--coordinator-concurrency", type=int, default=None,
                        help="Processes of the coordinator (default: the arm's GPU count, at least 2).")
    parser.add_argument("--model", type=Path, default=None, help="A model.toml to use instead of a random network.")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--keep", action="store_true", help="Keep the work directory (volumes, worker logs).")
    parser.add_argument("--out", type=Path, required=True, help="Directory for scale_gpus.jsonl.")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    run_in_tempdir("segq-scale-", run, parse_args(argv), logger)


def run(args: argparse.Namespace, root: Path) -> None:
    # As the launcher sees them: CUDA_VISIBLE_DEVICES, when set, limits the GPUs it hands out.
    available = len(visible_devices(get_settings().cuda_visible_devices, count_gpus))
    arms = [int(n) for n in args.gpus.split(",")] if args.gpus else default_arms(available)
    if max(arms) > available:
        raise SystemExit(f"--gpus {args.gpus} asks for {max(arms)} GPUs; {available} are visible")
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "scale_gpus.jsonl"
    model = network_model(args, root)
    inputs = make_volumes(root / "scans", args.volumes, args.shape)
    warmup = make_volumes(root / "warmup-scan", 1, args.shape, seed=99)[0]
    env = {"SEGQ_PRECISION": args.precision, "SEGQ_BACKEND": args.backend}
    names = gpu_names()
    results: list[dict[str, Any]] = []
    with redis_server(args.redis_server, args.redis_port, args.broker, root) as broker:
        for n in arms:
            coordinator = args.coordinator_concurrency or max(2, n)
            arm_root = root / f"gpus{n}"
            arm_root.mkdir()
            logger.info("%d GPU worker(s), coordinator concurrency %d", n, coordinator)
            worker_args = ["--gpus", str(n), "-n", f"bench{n}", "--coordinator-concurrency", str(coordinator)]
            result = run_arm(arm_root, broker, worker_args, n + 1, f"{n} gpu", model, warmup, inputs,
                             args.max_windows_per_subtask, args.timeout, env)
            base = results[0]["cases_per_hour"] if results else result["cases_per_hour"]
            speedup = result["cases_per_hour"] / base
            record = {"bench": "scale_gpus", "gpus": n, "gpu_names": names[:n], "gpus_present": available,
                      "shape": list(args.shape), "arch": args.arch, "feature_size": args.feature_size,
                      "roi": args.roi, "sw_batch_size": args.sw_batch_size, "precision": args.precision,
                      "backend": args.backend, "max_windows_per_subtask": args.max_windows_per_subtask,
                      "coordinator_concurrency": coordinator, **result,
                      f"speedup_vs_{arms[0]}": round(speedup, 3),
                      "efficiency": round(speedup * arms[0] / n, 3)}
            results.append(record)
            emit(record, out)
    for record in results:
        print(f"{record['gpus']} GPU worker(s): {record['cases_per_hour']:8.1f} cases/hour  "
              f"{record['subtasks_per_second']:7.2f} subtasks/s  speedup {record[f'speedup_vs_{arms[0]}']:.2f}  "
              f"efficiency {record['efficiency']:.2f}")


if __name__ == "__main__":
    main()
