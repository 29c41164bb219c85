"""What the queue costs: one volume through MONAI in one process vs the whole segq queue path.

(a) monai.inferers.sliding_window_inference on the preprocessed volume, in this process;
(b) `segq submit --wait` with one real `segq worker` (Redis, SQLite, storage, chord/merge), timed
    from submit to the mask on disk, with the worker's engine already loaded by a warm-up volume.
Both arms run alternately in one run; the ratio (b)/(a) is the queue's overhead.

    python -m bench.queue_overhead --repeats 3 --out bench/results/queue_overhead.jsonl
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.inferers import sliding_window_inference

from bench.common import deployment_env, emit, segq, summary, worker_process
from bench.throughput import make_model
from segq.pipeline.toml import load_model_spec
from worker.engines.model import load_model


def write_volume(root: Path, shape: tuple[int, int, int], seed: int) -> Path:
    volume = root / f"scans{seed}" / "volume.nii.gz"
    volume.parent.mkdir(parents=True)
    data = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(volume))
    return volume


def time_monai(volume: Path, model_toml: Path) -> float:
    spec = load_model_spec(model_toml)
    model = load_model(spec)
    data = torch.from_numpy(np.asarray(nib.load(str(volume)).get_fdata(dtype=np.float32)))[None, None]
    started = time.perf_counter()
    with torch.inference_mode():
        sliding_window_inference(data, spec.roi, spec.sw_batch_size, model, overlap=spec.overlap, mode=spec.mode)
    return time.perf_counter() - started


def time_queue(env: dict[str, str], volume: Path, out: Path, model_toml: Path, *extra: str) -> float:
    started = time.perf_counter()
    text = segq(env, "submit", str(volume), "--out", str(out), "--model", str(model_toml), "--wait", *extra)
    elapsed = time.perf_counter() - started
    if not re.search(r"1 done, 0 failed", text):
        raise RuntimeError(f"queue run did not finish cleanly:\n{text}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=(96, 96, 96))
    parser.add_argument("--arch", default="SwinUNETR")
    parser.add_argument("--feature-size", type=int, default=12)
    parser.add_argument("--roi", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/12")
    parser.add_argument("--out", type=Path, default=None, help="Append JSON lines here.")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())

    root = Path(tempfile.mkdtemp(prefix="segq-bench-"))
    model_toml = make_model(root / "model", args.arch, args.feature_size, args.roi, sw_batch_size=4)
    env = deployment_env(root, args.broker)
    import redis

    redis.Redis.from_url(args.broker).flushdb()
    monai_s, queue_s = [], []
    with worker_process(env, "bench", root / "worker.log"):
        # The warm-up loads the engine in the worker process. Each repeat gets new content: segq would
        # (rightly) not redo a volume it has already segmented with the same model and parameters.
        time_queue(env, write_volume(root, args.shape, 999), root / "warmup", model_toml)
        for i in range(args.repeats):
            volume = write_volume(root, args.shape, i)
            monai_s.append(time_monai(volume, model_toml))
            queue_s.append(time_queue(env, volume, root / f"out{i}", model_toml))
    a, b = summary(monai_s), summary(queue_s)
    emit({"bench": "queue_overhead", "machine": "cpu", "threads": torch.get_num_threads(), "shape": args.shape,
          "arch": args.arch, "feature_size": args.feature_size, "roi": args.roi, "repeats": args.repeats,
          "monai_s": a, "queue_s": b, "ratio_median": b["median"] / a["median"]}, args.out)
    print(f"(a) MONAI sliding_window_inference: {a['median']:.2f} s   (b) segq queue path: {b['median']:.2f} s   "
          f"ratio (b)/(a): {b['median'] / a['median']:.3f}")


if __name__ == "__main__":
    main()
