"""The queue-path and ONNX Runtime arms of bench/gpu_engines.py.

Queue path: one `segq worker` (SEGQ_BACKEND=torch, the arm's precision) on this machine's GPU and a
Redis server (the device command starts it), a .nii input per repeat (content differs by one voxel,
since segq does not redo a volume it has already segmented), `segq submit --wait`; the seconds are the
job's queued_at -> finished_at in the database: load, preprocess, workspace, chord, slab inference,
partial write, merge and the mask's NIfTI write, without the client's polling.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
import warnings
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import VOLUMES, deployment_env, segq, worker_process
from segq.modelspec import ModelSpec
from segq.pipeline.toml import write_model_toml
from segq.tiling import plan_windows
from worker.engines.model import TargetClassProbability

logger = logging.getLogger("segq.bench.queue")


def write_inputs(root: Path, name: str, volume: np.ndarray, repeats: int) -> list[Path]:
    """The volume as .nii (uncompressed: the bench is about inference, not gzip), then one variant per repeat."""
    import nibabel as nib

    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(repeats + 1):
        data = volume[0].copy()
        if i:
            data[0, 0, 0] += 1e-3 * i  # new content, so the job is not skipped as already done
        path = root / (f"{name}.nii" if i == 0 else f"{name}-r{i}.nii")
        nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
        paths.append(path)
    return paths


def submit_once(env: dict[str, str], path: Path, out: Path, model: Path, overlap: float, batch: int,
                dataset: str) -> dict[str, Any]:
    started = time.perf_counter()
    segq(env, "submit", str(path), "--out", str(out), "--model", str(model), "--overlap", str(overlap),
         "--sw-batch-size", str(batch), "--max-windows-per-subtask", "1024", "--name", dataset, "--wait",
         "--timeout", "900")
    wall = time.perf_counter() - started
    row = json.loads(segq(env, "results", dataset, "--format", "json"))[0]
    if row["status"] != "done":
        raise RuntimeError(f"queue job for {path.name} ended {row['status']}: {row.get('error')}")
    return {"seconds": job_seconds(env, dataset), "wall": wall, "output": row["output"],
            **{k: row.get(k) for k in ("inference_seconds", "preprocess_seconds", "merge_seconds", "subtasks")}}


def job_seconds(env: dict[str, str], dataset: str) -> float:
    """queued_at -> finished_at of the dataset's one job, read from the SQLite file at full resolution
    (`segq results` prints whole seconds)."""
    import sqlite3

    path = env["SEGQ_DATABASE_URL"].removeprefix("sqlite:///")
    with sqlite3.connect(path) as conn:
        queued, finished = conn.execute(
            "SELECT j.queued_at, j.finished_at FROM jobs j JOIN datasets d ON j.dataset_id = d.id WHERE d.name = ?",
            (dataset,)).fetchone()
    return (datetime.fromisoformat(finished) - datetime.fromisoformat(queued)).total_seconds()


def save_model(root: Path, spec: ModelSpec, network: torch.nn.Module) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().cpu() for k, v in network.state_dict().items()}
    torch.save(state, root / "model.pt")
    spec = ModelSpec(spec.arch, spec.in_channels, spec.out_channels, spec.roi_size, spec.target_class,
                     checkpoint=root / "model.pt", feature_size=spec.feature_size, sw_batch_size=spec.sw_batch_size)
    write_model_toml(root / "model.toml", spec)
    return root / "model.toml"


def run_queue(args: argparse.Namespace, spec: ModelSpec, network: torch.nn.Module,
              volumes: dict[str, tuple[tuple[int, int, int], float]], rec: Any,
              make_volume: Callable[[tuple[int, int, int]], np.ndarray], device: torch.device) -> None:
    import nibabel as nib
    import redis

    root = Path(tempfile.mkdtemp(prefix="segq-gpu-bench-"))
    model = save_model(root / "model", spec, network)
    repeats = args.queue_repeats or args.repeats
    inputs = {name: write_inputs(root / "in", name, make_volume(shape), repeats)
              for name, (shape, _overlap) in volumes.items()}
    batch = args.queue_batch
    for precision in args.queue_precisions:
        redis.Redis.from_url(args.broker).flushdb()
        env = {**deployment_env(root / precision, args.broker), "SEGQ_BACKEND": "torch", "SEGQ_PRECISION": precision,
               "SEGQ_DEVICE": "cuda:0" if device.type == "cuda" else "cpu"}
        arm = f"queue-torch-{precision}-b{batch}"
        log = root / f"worker-{precision}.log"
        try:
            with worker_process(env, f"gpu-{precision}", log):
                for name, (shape, overlap) in volumes.items():
                    windows = len(plan_windows(shape, spec.roi, overlap, spec.mode).starts)
                    first = submit_once(env, inputs[name][0], root / precision / "out", model, overlap, batch,
                                        f"{name}-warm")
                    mask = np.asarray(nib.load(first["output"]).dataobj).astype(bool)
                    runs = [submit_once(env, p, root / precision / "out", model, overlap, batch, f"{name}-{i}")
                            for i, p in enumerate(inputs[name][1:])]
                    rec.record(name, windows, arm, [r["seconds"] for r in runs], mask, precision=precision,
                               batch=batch, path="queue", wall_seconds=[round(r["wall"], 3) for r in runs],
                               inference_seconds=[r["inference_seconds"] for r in runs],
                               preprocess_seconds=[r["preprocess_seconds"] for r in runs],
                               merge_seconds=[r["merge_seconds"] for r in runs], subtasks=first["subtasks"],
                               warmup_seconds=round(first["seconds"], 3))
        except Exception as exc:  # one arm's failure must not lose the others' figures
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            logger.error("queue arm %s failed: %s\n%s", arm, exc, tail)
            rec.record_error(arm, f"{type(exc).__name__}: {exc}")


def onnxruntime_roi(spec: ModelSpec, network: torch.nn.Module) -> dict[str, Any]:
    """Export the wrapped network (traced where it lives), then time one ROI in ONNX Runtime's best provider here."""
    import onnxruntime as ort

    from worker.engines.onnx_export import OPSET
    from worker.engines.plans import INPUT_NAME, OUTPUT_NAME

    device = next(network.parameters()).device
    wrapped = TargetClassProbability(network, spec.target_class, spec.out_channels).eval()
    path = Path(tempfile.mkdtemp(prefix="segq-onnx-")) / "model.onnx"
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(1, spec.in_channels, *spec.roi)).astype(np.float32))
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapped, (x.to(device),), str(path), dynamo=False, opset_version=OPSET,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    export_s = time.perf_counter() - started
    providers = ort.get_available_providers()
    session = ort.InferenceSession(str(path), providers=[p for p in providers if p in ("CUDAExecutionProvider",
                                                                                          "CPUExecutionProvider")])
    started = time.perf_counter()
    ours = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
    first = time.perf_counter() - started
    started = time.perf_counter()
    session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})
    second = time.perf_counter() - started
    with torch.inference_mode():
        reference = wrapped(x.to(device)).float().cpu().numpy()
    estimate = {name: round(second * len(plan_windows(shape, spec.roi, overlap, spec.mode).starts), 1)
                for name, (shape, overlap) in VOLUMES.items()}
    return {"arm": "onnxruntime-roi", "provider": session.get_providers()[0], "available_providers": providers,
            "export_seconds": round(export_s, 1), "first_roi_seconds": round(first, 2),
            "roi_seconds": round(second, 2), "max_abs_diff_vs_torch_fp32": float(np.max(np.abs(ours - reference))),
            "volume_seconds_estimate": estimate}
