"""What a volume costs off the GPU: prepare, each part's host side, and merge, with the production functions.

A volume cut into ``--parts`` parts on as many GPUs waits for its prepare, then for its slowest part, then
for its merge; only the part's device time shrinks with more GPUs. This times the rest, on this machine's
cores, with no GPU and no queue:

- **prepare**: ``worker.jobs.prepare`` as the coordinator runs it (hash check, header, gzip decode, z-score,
  padding, the workspace write);
- **part host**: what a GPU worker does around the device for one part: read its rows from the workspace
  into (pinned, where CUDA is present) memory, and write its partial (the partial's values are made up:
  its layout and size are the real ones);
- **merge**: ``worker.jobs.merge`` (read and check the partials, add them, threshold, write the .nii.gz
  mask; at commits before parts divided their partials on the device, also divide by the weight sum).

One CT-size 512x512x300 int16 volume and one BraTS-size 240x240x155 float32 volume by default, made as
``bench/peer_folder.py`` makes them. ``--repeats`` runs each; the first repeat is left out of the medians (it
pays a process's first touch of memory and, at those earlier commits, the weight sum that later volumes of
the same shape find cached).

    python -m bench.volume_costs --out bench/results
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import peer_folder
from bench.common import emit, run_in_tempdir

logger = logging.getLogger("bench.volume_costs")

VOLUMES = {"ct": ((512, 512, 300), "int16"), "brats": ((240, 240, 155), "float32")}


def job_for(path: Path, out: Path, roi: int, overlap: float) -> Any:
    from segq.models import Status
    from segq.modelspec import ModelSpec, file_sha256
    from segq.records import JobView

    spec = ModelSpec(arch="swinunetr", in_channels=1, out_channels=2, roi_size=roi, target_class=1,
                     checkpoint=Path("unused.pt"), preprocess="zscore", overlap=overlap)
    model = {k: (str(v) if isinstance(v, Path) else v) for k, v in spec.__dict__.items()}
    return JobView(id="bench", dataset_id="bench", attempt=1, status=Status.RUNNING, input_path=str(path),
                   output_path=str(out), model=model, model_sha256="", params={},
                   input_sha256=file_sha256(path))


def part_host(ws: Path, index: int) -> tuple[dict[str, Any], float, float]:
    """A GPU worker's host side of part ``index``: read its rows (seconds), write a partial of the real
    layout (seconds). With no GPU the partial's transposition to the workspace's order, a device kernel
    on a GPU, runs on the CPU and is counted in the write."""
    import torch

    from segq import storage
    from worker import jobs
    from worker.engines import inference

    started = time.perf_counter()
    _plan, slabs = jobs.load_plan(ws)
    slab = slabs[index]
    volume = jobs.load_input(ws) if hasattr(jobs, "load_input") else storage.load_array(ws / jobs.INPUT, mmap=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = inference.read_slab(volume, slab, device)
    read = time.perf_counter() - started
    partial = torch.full((slab.hi - slab.lo, *volume.shape[2:]), 0.25, dtype=torch.float32, device=device)
    partial += rows.to(device).mean() * 0.0  # the rows are used, as an engine would
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    to_host = getattr(inference, "partial_to_host", None)  # the layout infer_slab hands back (later commits)
    array = to_host(partial, volume) if to_host else partial.cpu().numpy()
    checksum = storage.array_checksum(array)
    storage.save_array_once(ws / jobs.slab_file(index), array)
    return jobs.slab_reference(slab, array.shape, checksum, "bench"), read, time.perf_counter() - started


def one_volume(path: Path, root: Path, parts: int, roi: int, overlap: float) -> dict[str, Any]:
    from segq import storage
    from segq.settings import Settings
    from worker import jobs

    settings = Settings(storage=str(root / "storage"))
    out = root / "masks" / path.name
    out.parent.mkdir(parents=True, exist_ok=True)
    job = job_for(path, out, roi, overlap)
    shutil.rmtree(settings.storage_root, ignore_errors=True)
    ws = storage.workspace(settings.storage_root, job.id, job.attempt)
    started = time.perf_counter()
    prepared = jobs.prepare(job, settings, lambda windows: parts)
    prepare = time.perf_counter() - started
    refs, reads, writes = [], [], []
    for index in range(len(prepared.slabs)):
        ref, read, write = part_host(ws, index)
        refs.append(ref)
        reads.append(read)
        writes.append(write)
    hosts = [r + w for r, w in zip(reads, writes, strict=True)]
    started = time.perf_counter()
    jobs.merge(ws, refs, path, out)
    merge = time.perf_counter() - started
    return {"prepare_s": round(prepare, 3), "part_host_max_s": round(max(hosts), 3),
            "part_read_max_s": round(max(reads), 3), "part_write_max_s": round(max(writes), 3),
            "merge_s": round(merge, 3),
            "critical_path_s": round(prepare + max(hosts) + merge, 3), "windows": len(prepared.plan.starts),
            "parts": len(prepared.slabs)}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--volumes", default="ct,brats", help=f"Which of {', '.join(VOLUMES)} to run.")
    parser.add_argument("--parts", type=int, default=4, help="Parts a volume is cut into (the GPUs it spans).")
    parser.add_argument("--roi", type=int, default=96)
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--label", default="", help="Recorded with each line (a commit, a machine).")
    parser.add_argument("--data", type=Path, help="Keep the made volumes here between runs (made if missing).")
    parser.add_argument("--out", type=Path, help="Directory for volume_costs.jsonl.")
    return parser.parse_args(argv)


def run(args: argparse.Namespace, root: Path) -> None:
    data = args.data or root / "scans"
    out = args.out / "volume_costs.jsonl" if args.out else None
    kinds = args.volumes.split(",")
    for kind in kinds:  # all made first: make_volumes forks, which must happen before torch starts its threads
        shape, dtype = VOLUMES[kind]
        if not (data / f"{kind}000.nii.gz").exists():
            peer_folder.make_volumes(data, 1, shape, seed=7, dtype=dtype, prefix=kind)
    for kind in kinds:
        shape, dtype = VOLUMES[kind]
        path = data / f"{kind}000.nii.gz"
        runs = [one_volume(path, root, args.parts, args.roi, args.overlap) for _ in range(args.repeats)]
        steady = runs[1:] or runs
        record: dict[str, Any] = {"bench": "volume_costs", "volume": kind, "shape": list(shape), "dtype": dtype,
                                  "label": args.label, "cores": os.cpu_count(), "runs": runs}
        for key in ("prepare_s", "part_host_max_s", "part_read_max_s", "part_write_max_s", "merge_s",
                    "critical_path_s"):
            record[f"median_{key}"] = round(statistics.median(r[key] for r in steady), 3)
        emit(record, out)
        logger.info("%s: prepare %.3f s, part read %.3f s + write %.3f s, merge %.3f s (medians after the first "
                    "repeat)", kind, record["median_prepare_s"], record["median_part_read_max_s"],
                    record["median_part_write_max_s"], record["median_merge_s"])


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    run_in_tempdir("segq-volume-costs-", run, args, logger)


if __name__ == "__main__":
    main()
