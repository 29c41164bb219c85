"""segq against the folder split over 1..N GPUs, and one CT-size volume's latency over 1..N GPUs, in one run.

One command for a GPU machine. It makes the files once (BraTS-size .nii.gz volumes, as shared/peers
makes them, and one CT-size int16 .nii.gz), starts a Redis server (``--redis-server``, e.g.
.whl/redis/redis-server from /work/shared/device/redis.sh; or uses ``--broker``), then for each GPU count:

- **peer**: the folder split over one tuned MONAI process per GPU (bench/peer_folder.py), same files;
- **segq**: a real launcher (`segq worker --gpus N`: a device worker a GPU, threads pool, plus the
  coordinator) on a deployment of its own (Redis flushed, SQLite, storage), warmed up with three volumes
  a GPU; then the dataset is submitted at once and timed from `segq submit` to the last
  mask. The timeline (table ``steps``) gives each GPU's busy fraction, in the steady state (all GPUs
  started, none finished) and overall, the first mask's delay and the largest number of workspaces;
- **ct**: in the same warm launcher, the CT-size volume alone, ``--ct-repeats`` times: its latency from the
  job row (written by `segq submit` after hashing) to the mask, and from the start of `segq submit`.

    python -m bench.scale_gpus --redis-server .whl/redis/redis-server --gpus 1,4 --out "$OUT"

JSON lines go to <out>/scale_gpus.jsonl; ratios are against the peer with the same GPUs and against
segq's own first arm. This process never initialises CUDA; only the workers and the peer do.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import latency, peer_folder
from bench.common import ROOT, deployment_env, emit, run_in_tempdir, segq
from bench.throughput import add_network_arguments, launched, network_model, run_set
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


class WorkspaceCount:
    """The largest number of job workspaces seen under the storage, sampled every 50 ms in a thread."""

    def __init__(self, storage: Path) -> None:
        self.jobs, self.most, self._stop = storage / "jobs", 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            with suppress(FileNotFoundError):  # a workspace removed while listed
                self.most = max(self.most, sum(1 for _ in self.jobs.iterdir()) if self.jobs.is_dir() else 0)

    def __enter__(self) -> WorkspaceCount:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def timeline_figures(env: dict[str, str], dataset: str, submitted: datetime) -> dict[str, Any]:
    """Busy fractions, first mask and stage seconds of one dataset, read from the deployment's SQLite."""
    from sqlalchemy import select

    from segq.db import session_scope
    from segq.models import Dataset, Job
    from segq.timeline import device_use, load_steps, steady_window

    url = env["SEGQ_DATABASE_URL"]
    with session_scope(url) as s:
        ids = list(s.scalars(select(Dataset.id).where(Dataset.name == dataset)))
        jobs = list(s.scalars(select(Job).where(Job.dataset_id.in_(ids))))
    steps = load_steps(ids, url)
    window = steady_window(steps)
    overall = device_use(steps)
    steady = device_use(steps, *window) if window else []
    merges = [st.finished_at for st in steps if st.step == "merge"]
    finished = [j.finished_at for j in jobs if j.finished_at is not None]

    def median(values: list[float]) -> float | None:
        values = sorted(v for v in values if v is not None)
        return round(values[len(values) // 2], 3) if values else None

    return {
        "busy_fraction_steady": {u.worker: round(u.busy_fraction, 3) for u in steady},
        "steady_seconds": round((window[1] - window[0]).total_seconds(), 3) if window else None,
        "busy_fraction_overall": {u.worker: round(u.busy_fraction, 3) for u in overall},
        "parts_per_gpu": {u.worker: u.parts for u in overall},
        "first_mask_seconds": round((min(merges) - submitted).total_seconds(), 3) if merges else None,
        # submit started -> last mask written: `segq submit` itself (start-up, hashing) counts, the poll of --wait not
        "to_last_mask_seconds": round((max(finished) - submitted).total_seconds(), 3) if finished else None,
        # the job rows' own span: queued (rows written) -> last mask, the part that scales with GPUs
        "queued_to_mask_seconds": round((max(finished) - min(j.queued_at for j in jobs)).total_seconds(), 3)
        if finished else None,
        "median_prepare_seconds": median([j.preprocess_seconds for j in jobs]),
        "median_inference_seconds": median([j.inference_seconds for j in jobs]),
        "median_merge_seconds": median([j.merge_seconds for j in jobs]),
        "parts": sum(int(j.subtasks or 0) for j in jobs),
    }


def arm_name(base: str, compile_mode: str, args: argparse.Namespace) -> str:
    """``segq`` / ``ct latency``, with the compile mode when the run compares several."""
    return base if len(args.torch_compile) == 1 else f"{base} [{compile_mode}]"


def engine_ready_seconds(log: Path) -> list[float]:
    """Seconds each GPU worker took to load its engine (compile and accuracy gate included), from its log."""
    return [float(m.group(1)) for m in re.finditer(r"engine ready in ([0-9.]+) s", log.read_text(errors="replace"))]


@contextlib.contextmanager
def keep_log(log: Path, copy: Path) -> Iterator[None]:
    """Copy the arm's worker log next to the results however the arm ends (a time limit included)."""
    try:
        yield
    finally:
        if log.exists():
            shutil.copyfile(log, copy)


def segq_arms(args: argparse.Namespace, root: Path, broker: str, n: int, model: Path, warmup: list[Path],
              inputs: list[Path], ct: list[Path], compile_mode: str,
              engine_seconds: float | None = None) -> list[dict[str, Any]]:
    """The dataset and the CT latency on ``n`` GPUs, in one warm launcher."""
    import redis

    arm_root = root / f"gpus{n}-{compile_mode}"
    arm_root.mkdir()
    redis.Redis.from_url(broker).flushdb()
    env = {**deployment_env(arm_root, broker), "SEGQ_PRECISION": args.precision, "SEGQ_BACKEND": args.backend,
           "SEGQ_LOOKAHEAD": str(args.lookahead), "SEGQ_TORCH_COMPILE": compile_mode,
           # one inductor cache for the whole run, as one machine has: the engine-alone arm compiled first
           "SEGQ_ENGINE_DIR": str(root / "engines")}
    worker_args = ["--gpus", str(n), "-n", f"bench{n}"]
    if args.coordinator_concurrency:
        worker_args += ["--coordinator-concurrency", str(args.coordinator_concurrency)]
    records = []
    with keep_log(arm_root / "workers.log", args.out / f"workers-gpus{n}-{compile_mode}.log"), \
            launched(env, arm_root / "workers.log", worker_args, n + 1):
        # Three full volumes a GPU: each worker thread loads the engine and autotunes cuDNN for the dataset's
        # batch shape (cuDNN's plans are per thread) before the clock starts, as the peer warms up on a volume.
        run_set(env, warmup[: 3 * n], arm_root / "warmup", model, "warmup", args.max_windows_per_subtask,
                args.timeout, ["--overlap", str(args.overlap)])
        submitted = datetime.now(UTC)
        with WorkspaceCount(arm_root / "storage") as workspaces:
            seconds, rows = run_set(env, inputs, arm_root / "masks", model, "set", args.max_windows_per_subtask,
                                    args.timeout, ["--overlap", str(args.overlap)])
        figures = timeline_figures(env, "set", submitted)
        wall = figures["to_last_mask_seconds"] or seconds
        records.append({"arm": arm_name("segq", compile_mode, args), "gpus": n, "torch_compile": compile_mode,
                        "engine_ready_seconds": engine_ready_seconds(arm_root / "workers.log"), "volumes": len(rows),
                        "seconds": round(wall, 3),
                        "cases_per_hour": round(len(rows) / wall * 3600, 1), "submit_wait_seconds": round(seconds, 3),
                        "max_workspaces": workspaces.most, "lookahead_bound": n * (args.lookahead + 1), **figures})
        if ct:
            records.append(ct_latency(args, env, arm_root, n, model, ct, compile_mode, engine_seconds))
    return records


def ct_latency(args: argparse.Namespace, env: dict[str, str], arm_root: Path, n: int, model: Path, ct: list[Path],
               compile_mode: str, engine_seconds: float | None) -> dict[str, Any]:
    """The CT-size volume alone, ``--ct-repeats`` times in the warm launcher: submit to mask (the `segq submit`
    process' start included), job row to mask, both against the engine alone (bench/latency.py)."""
    runs = []
    for repeat, scan in enumerate(ct):  # a new volume each time: the same one again would be reused
        name = f"ct{repeat}"
        extra = ("--max-windows-per-subtask", str(args.max_windows_per_subtask), "--overlap", str(args.ct_overlap))
        started, seconds, timings = latency.submit_and_wait(env, scan, arm_root / name, model, name, args.timeout,
                                                            extra)
        figures = timeline_figures(env, name, started)
        rows = json.loads(segq(env, "results", name, "--format", "json"))
        runs.append({"submit_wait_seconds": round(seconds, 3), "windows": rows[0]["windows"], **figures,
                     **latency.run_figures(figures, timings, engine_seconds)})
    summary = latency.summary(runs, engine_seconds, n)
    return {"arm": arm_name("ct latency", compile_mode, args), "shape": list(args.ct_shape), "overlap": args.ct_overlap,
            "runs": runs, **summary, "seconds": min(r["queued_to_mask_seconds"] for r in runs),
            "to_last_mask_seconds": min(r["to_last_mask_seconds"] for r in runs)}


def ct_engine_seconds(results: list[dict[str, Any]], args: argparse.Namespace, compile_mode: str) -> float | None:
    """The engine alone on the CT-size volume, from this run's engine arm (else ``--ct-engine-seconds``)."""
    found = [r["seconds"] for r in results if r.get("arm") == "engine alone" and r.get("shape") == list(args.ct_shape)
             and r.get("torch_compile", "off") == engine_compile_mode(compile_mode, args.precision)]
    return min(found) if found else args.ct_engine_seconds


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", default=None, help="GPU counts to compare, e.g. 1,4 (default: 1, 2, 4 … N).")
    parser.add_argument("--arms", default="engine,peer,segq,ct", help="Which of engine, peer, segq, ct to run.")
    parser.add_argument("--redis-server", type=Path, default=None, help="Start this redis-server binary.")
    parser.add_argument("--redis-port", type=int, default=6390)
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/11",
                        help="Without --redis-server: a Redis database this run may flush.")
    parser.add_argument("--volumes", type=int, default=48)
    parser.add_argument("--shape", type=int, nargs=3, default=(240, 240, 155))
    parser.add_argument("--ct-shape", type=int, nargs=3, default=(512, 512, 300))
    parser.add_argument("--ct-overlap", type=float, default=0.5)
    parser.add_argument("--ct-repeats", type=int, default=2)
    parser.add_argument("--ct-engine-seconds", type=float, default=None,
                        help="The engine alone on the CT-size volume, for the ct arm's ratios when the engine arm "
                        "does not run (3.93: SwinUNETR fs48 fp16 compiled on an H200).")
    add_network_arguments(parser, "SwinUNETR", 48, 96, 16)
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--max-windows-per-subtask", type=int, default=1024)
    parser.add_argument("--lookahead", type=int, default=3)
    parser.add_argument("--precision", default="fp16", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--torch-compile", default="auto", type=lambda text: text.split(","),
                        help="SEGQ_TORCH_COMPILE for the segq arms; several, comma-separated, run one after another "
                             "(e.g. off,default: the queue's gain from compiling, in one run).")
    parser.add_argument("--coordinator-concurrency", type=int, default=None,
                        help="Processes of the coordinator (default: the launcher's, which follows cores and GPUs).")
    parser.add_argument("--model", type=Path, default=None, help="A model.toml to use instead of a random network.")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--keep", action="store_true", help="Keep the work directory (volumes, worker logs).")
    parser.add_argument("--out", type=Path, required=True, help="Directory for scale_gpus.jsonl.")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    # `timeout` ends a run with SIGTERM: raise SystemExit instead, so the cleanups (worker logs kept, the
    # launcher and redis-server stopped) run.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    run_in_tempdir("segq-scale-", run, parse_args(argv), logger)


def run(args: argparse.Namespace, root: Path) -> None:
    # As the launcher sees them: CUDA_VISIBLE_DEVICES, when set, limits the GPUs it hands out.
    available = len(visible_devices(get_settings().cuda_visible_devices, count_gpus))
    gpus = [int(n) for n in args.gpus.split(",")] if args.gpus else default_arms(available)
    if max(gpus) > available:
        raise SystemExit(f"--gpus {args.gpus} asks for {max(gpus)} GPUs; {available} are visible")
    arms = set(args.arms.split(","))
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "scale_gpus.jsonl"
    started = time.perf_counter()
    inputs = peer_folder.make_volumes(root / "scans", args.volumes, tuple(args.shape))
    warmup = peer_folder.make_volumes(root / "warmup-scan", 3 * max(gpus), tuple(args.shape), seed=99, prefix="w")
    ct = peer_folder.make_volumes(root / "ct-scan", args.ct_repeats, tuple(args.ct_shape), seed=7, dtype="int16",
                                  prefix="ct") if "ct" in arms else []
    model = network_model(args, root)
    logger.info("made the files in %.1f s", time.perf_counter() - started)
    setting = {"bench": "scale_gpus", "gpu_names": gpu_names(), "gpus_present": available, "shape": list(args.shape),
               "arch": args.arch, "feature_size": args.feature_size, "roi": args.roi, "overlap": args.overlap,
               "sw_batch_size": args.sw_batch_size, "precision": args.precision, "backend": args.backend,
               "lookahead": args.lookahead, "cpus": os.cpu_count()}
    results: list[dict[str, Any]] = []
    if "engine" in arms:
        for shape, overlap in ((args.shape, args.overlap), (args.ct_shape, args.ct_overlap)):
            for mode in args.torch_compile:
                argv = [sys.executable, "-m", "bench.engine_alone", str(model), *map(str, shape), str(overlap),
                        args.precision, engine_compile_mode(mode, args.precision)]
                env = {**os.environ, "CUDA_VISIBLE_DEVICES": "0", "SEGQ_ENGINE_DIR": str(root / "engines")}
                line = subprocess.run(argv, capture_output=True, text=True, check=True, cwd=ROOT,
                                      env=env).stdout.strip().splitlines()[-1]
                results.append({**setting, "gpus": 1, **json.loads(line)})
                emit(results[-1], args.out / "scale_gpus_arms.jsonl")
    with redis_server(args.redis_server, args.redis_port, args.broker, root) as broker:
        for n in gpus:
            if "peer" in arms:
                results.append({**setting, **peer_folder.run(root / "scans", n, root / f"peer{n}", args.feature_size,
                                                             args.roi, args.sw_batch_size, args.overlap)})
                emit(results[-1], args.out / "scale_gpus_arms.jsonl")  # each arm as it ends: a cut-off run keeps it
            for mode in args.torch_compile if arms & {"segq", "ct"} else []:
                engine = ct_engine_seconds(results, args, mode) if ct else None
                for record in segq_arms(args, root, broker, n, model, warmup, inputs, ct, mode, engine):
                    results.append({**setting, **record})
                    emit(results[-1], args.out / "scale_gpus_arms.jsonl")
    finish(results, out)


def engine_compile_mode(setting: str, precision: str) -> str:
    """What SEGQ_TORCH_COMPILE=setting resolves to on a GPU, for the engine-alone arm ("off": eager)."""
    import torch

    from worker.engines import compile_mode

    return compile_mode(setting, precision, torch.device("cuda")) or "off"


def finish(results: list[dict[str, Any]], out: Path) -> None:
    """Add the ratios (against the peer on as many GPUs, and against the arm's own fewest GPUs); write; print."""
    def find(arm: str, gpus: int) -> dict[str, Any] | None:
        return next((r for r in results if r["arm"] == arm and r["gpus"] == gpus), None)

    for record in results:
        if record["arm"] == "engine alone":
            emit(record, out)
            continue
        first = min(r["gpus"] for r in results if r["arm"] == record["arm"])
        base = find(record["arm"], first)
        if (record["arm"].startswith("segq") or record["arm"] == "peer folder split") and base:
            record["efficiency_vs_own_first"] = round(record["cases_per_hour"] / base["cases_per_hour"] * first
                                                      / record["gpus"], 3)
        peer = find("peer folder split", record["gpus"])
        if record["arm"].startswith("segq") and peer:
            record["ratio_vs_peer"] = round(record["cases_per_hour"] / peer["cases_per_hour"], 3)
        if record["arm"].startswith("ct latency") and base:
            record["speedup_vs_own_first"] = round(base["seconds"] / record["seconds"], 3)
            record["speedup_from_submit"] = round(base["to_last_mask_seconds"] / record["to_last_mask_seconds"], 3)
            latency.add_speedups([r for r in results if r["arm"] == record["arm"]])
        emit(record, out)
    for record in results:
        if record["arm"] == "engine alone":
            print(f"engine alone {record['shape']} compile {record.get('torch_compile', 'off')}: "
                  f"{record['seconds']:.3f} s ({record['ms_per_window']} ms a window)")
        elif record["arm"].startswith("ct latency"):
            print(f"{record['arm']}, {latency.describe(record)} (medians; best {record['seconds']:.2f} s job row to "
                  f"mask, {record['to_last_mask_seconds']:.2f} s from submit)")
        else:
            extra = f"  x peer {record['ratio_vs_peer']:.2f}" if "ratio_vs_peer" in record else ""
            busy = record.get("busy_fraction_steady")
            shown = f"  busy (steady) {json.dumps(busy)}" if busy else ""
            print(f"{record['gpus']} GPU(s) {record['arm']:>17}: {record['cases_per_hour']:8.1f} cases/hour  "
                  f"efficiency {record.get('efficiency_vs_own_first', 1.0):.2f}{extra}{shown}")


if __name__ == "__main__":
    main()
