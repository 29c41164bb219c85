"""A dataset through the whole queue on one GPU, against MONAI's sliding_window_inference, in one run.

The figure a user feels: volumes per hour when a dataset is queued. Arms, on the same volumes:

  baseline   monai.inferers.sliding_window_inference, fp32, the volume already on the GPU, one volume
             after another in this process (no file I/O counted: the baseline's best case)
  queue-*    `segq worker --gpus 1` (one GPU worker process + the coordinator process), Redis, SQLite,
             the volumes queued as one dataset; seconds from the first job queued to the last mask
             written (the database's own timestamps), so loading, preprocessing, slab inference,
             partial writes, merges and NIfTI writes are all counted, overlapped as the queue runs them

Each arm prints seconds per volume, volumes per hour, its ratio to the baseline and the voxel
agreement and Dice of its masks with the baseline's.

    python3 -m bench.gpu_dataset --redis-server .whl/redis/redis-server --out "$OUT"
"""

from __future__ import annotations

import argparse
import json
import logging
import sqlite3
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from bench.common import deployment_env, emit, run_in_tempdir, segq
from bench.scale_gpus import gpu_names, redis_server
from bench.throughput import add_network_arguments, launched, make_volumes, network_model, run_set

logger = logging.getLogger("segq.bench.gpu_dataset")


def baseline(model_toml: Path, inputs: list[Path], overlap: float, batch: int,
             device: str) -> tuple[float, list[np.ndarray]]:
    """Median seconds per volume of MONAI's sliding_window_inference in fp32, and its masks."""
    import torch
    from monai.inferers import sliding_window_inference

    from segq.pipeline.toml import load_model_spec
    from worker.engines.model import load_model

    spec = load_model_spec(model_toml)
    model = load_model(spec).to(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times, masks = [], []
    with torch.inference_mode():
        for i, path in enumerate([inputs[0], *inputs]):  # the first pass warms cuDNN up, untimed
            data = torch.from_numpy(np.asarray(nib.load(str(path)).get_fdata(dtype=np.float32)))[None, None].to(device)
            sync()
            started = time.perf_counter()
            prob = sliding_window_inference(data, spec.roi, batch, model, overlap=overlap, mode=spec.mode)
            sync()
            if i:
                times.append(time.perf_counter() - started)
                masks.append((prob[0, 0] >= 0.5).cpu().numpy())
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return float(np.median(times)), masks


def span_seconds(db: Path, dataset: str) -> float:
    """First queued_at to last finished_at of the dataset's jobs."""
    with sqlite3.connect(db) as conn:
        first, last = conn.execute("SELECT min(j.queued_at), max(j.finished_at) FROM jobs j JOIN datasets d "
                                   "ON j.dataset_id = d.id WHERE d.name = ?", (dataset,)).fetchone()
    return (datetime.fromisoformat(last) - datetime.fromisoformat(first)).total_seconds()


def agreement(masks: list[np.ndarray], rows: list[dict[str, Any]], inputs: list[Path]) -> tuple[float, float]:
    by_input = {Path(r["input"]).name: r["output"] for r in rows}
    equal, total, inter, sizes = 0, 0, 0, 0
    for reference, path in zip(masks, inputs, strict=True):
        ours = np.asarray(nib.load(by_input[path.name]).dataobj).astype(bool)
        equal += int(np.count_nonzero(ours == reference))
        total += reference.size
        inter += int(np.count_nonzero(ours & reference))
        sizes += int(np.count_nonzero(ours)) + int(np.count_nonzero(reference))
    return equal / total, (2 * inter / sizes if sizes else 1.0)


def run(args: argparse.Namespace, root: Path) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "gpu_dataset.jsonl"
    model = network_model(args, root)
    inputs = make_volumes(root / "scans", args.volumes, args.shape)
    warmup = make_volumes(root / "warmup-scan", 1, args.shape, seed=99)[0]
    base_s, masks = baseline(model, inputs, args.overlap, args.sw_batch_size, args.device)
    common = {"bench": "gpu_dataset", "gpu": gpu_names()[:1], "shape": list(args.shape), "volumes": args.volumes,
              "overlap": args.overlap, "roi": args.roi, "feature_size": args.feature_size}
    emit({**common, "arm": "baseline-monai-fp32", "seconds_per_volume": round(base_s, 4),
          "volumes_per_hour": round(3600 / base_s, 1), "ratio": 1.0}, out)
    with redis_server(args.redis_server, args.redis_port, args.broker, root) as broker:
        for arm in args.precisions:
            import redis

            redis.Redis.from_url(broker).flushdb()
            precision, _, variant = arm.partition("-")
            arm_root = root / arm
            arm_root.mkdir()
            env = {**deployment_env(arm_root, broker), "SEGQ_PRECISION": precision, "SEGQ_BACKEND": "torch",
                   "SEGQ_TORCH_COMPILE": "1" if variant == "compile" else "0"}
            extra = ["--overlap", str(args.overlap), "--sw-batch-size", str(args.queue_batch)]
            gpus = "1" if args.device.startswith("cuda") else "none"
            with launched(env, arm_root / "workers.log", ["--gpus", gpus, "-n", f"bench-{arm}",
                                                         "--coordinator-concurrency", str(args.coordinators)], 2):
                segq(env, "submit", str(warmup), "--out", str(arm_root / "warm"), "--model", str(model), "--name",
                     "warmup", "--wait", "--timeout", "900", *extra)
                wall, rows = run_set(env, inputs, arm_root / "masks", model, "set", args.max_windows, 1800, extra)
            seconds = span_seconds(arm_root / "segq.db", "set") / len(inputs)
            agree, dice = agreement(masks, rows, inputs)
            emit({**common, "arm": f"queue-torch-{arm}-b{args.queue_batch}", "precision": precision,
                  "seconds_per_volume": round(seconds, 4), "volumes_per_hour": round(3600 / seconds, 1),
                  "ratio": round(base_s / seconds, 3), "client_wall_seconds": round(wall, 2),
                  "subtasks": sum(int(r["subtasks"]) for r in rows), "agreement": round(agree, 6),
                  "dice": round(dice, 6), "inference_seconds": [r["inference_seconds"] for r in rows],
                  "preprocess_seconds": [r["preprocess_seconds"] for r in rows],
                  "merge_seconds": [r["merge_seconds"] for r in rows],
                  "workers": sorted({w for r in rows for w in str(r["workers"]).split(",") if w})}, out)
    for line in out.read_text().splitlines():
        r = json.loads(line)
        print(f"{r['arm']:28s} {r['seconds_per_volume']:8.3f} s/volume {r['volumes_per_hour']:9.1f} volumes/h  "
              f"x{r['ratio']:.2f}" + (f"  agreement {r['agreement']:.4%} Dice {r['dice']:.4f}" if "dice" in r else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--volumes", type=int, default=8)
    parser.add_argument("--shape", type=int, nargs=3, default=(240, 240, 155))
    parser.add_argument("--overlap", type=float, default=0.5)
    add_network_arguments(parser, "SwinUNETR", 48, 96, 8, "The baseline's batch.")
    parser.add_argument("--queue-batch", type=int, default=16, help="Our engine's ROI batch.")
    parser.add_argument("--max-windows", type=int, default=32, help="Windows per subtask.")
    parser.add_argument("--coordinators", type=int, default=3, help="Coordinator processes (load, merge, write).")
    parser.add_argument("--precisions", nargs="+", default=["fp16", "fp32"],
                        help="Queue arms: fp32, fp16, bf16, each optionally with -compile (SEGQ_TORCH_COMPILE=1).")
    parser.add_argument("--redis-server", type=Path, default=None)
    parser.add_argument("--redis-port", type=int, default=6391)
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/10")
    parser.add_argument("--device", default="cuda", help="cpu for a smoke run on a machine without a GPU.")
    parser.add_argument("--keep", action="store_true", help="Keep the work directory (databases, logs).")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    run_in_tempdir("segq-dataset-", run, args, logger)


if __name__ == "__main__":
    main()
