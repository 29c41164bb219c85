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

For a MONAI bundle (Model Zoo's spleen_ct_segmentation, its real config, as bench/bundle_dataset.py writes it)
it times what segq runs of the bundle on the coordinator, step by step (``--bundle-shapes``):

- **bundle preprocessing** at prepare: each transform of the config's ``preprocessing`` Compose in turn
  (LoadImaged, EnsureChannelFirstd, Orientationd, Spacingd, ScaleIntensityRanged, EnsureTyped), then segq's
  ``bundle_stages.preprocess_case`` whole (the same transforms through the Compose) and the trace's JSON write;
- **bundle inversion** at merge: each transform of the ``postprocessing`` segq runs (Activationsd, Invertd,
  AsDiscreted; SaveImaged is segq's own write), on two channels of smooth made-up logits on the model's grid,
  then segq's ``bundle_stages.postprocess`` whole (trace read back from JSON included).

The CTs are bench/bundle_dataset.py's phantoms (int16 HU, 0.78x0.78x2.5 mm, an LPS-stored affine):
512x512x110 by default, ``--bundle-shapes 512x512x110,512x512x300`` for a 300-slice one too, ``none`` to skip.
``--threads`` sets torch's threads (a coordinator process gets cores / processes of them under the launcher).

One CT-size 512x512x300 int16 volume and one BraTS-size 240x240x155 float32 volume by default, made as
``bench/peer_folder.py`` makes them. ``--repeats`` runs each; the first repeat is left out of the medians (it
pays a process's first touch of memory and, at those earlier commits, the weight sum that later volumes of
the same shape find cached).

    python -m bench.volume_costs --out bench/results
    python -m bench.volume_costs --volumes none --bundle-shapes 512x512x110,512x512x300 --out bench/results
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
    planned = time.perf_counter() - started
    first_ready = planned
    if prepared.stream is not None:  # a split volume's input streamed (issue 23): parts go out at `planned`
        from worker import streaming

        bounds = streaming.chunk_bounds(prepared.slabs, prepared.plan.padded_shape[0])
        marks: list[float] = []
        prepared.stream(lambda: marks.append(time.perf_counter()) or False)  # asked before each chunk
        first_ready = (marks[1] if len(marks) > 1 and len(bounds) > 1 else time.perf_counter()) - started
    prepare = time.perf_counter() - started
    refs, reads, writes = [], [], []
    for index in range(len(prepared.slabs)):
        ref, read, write = part_host(ws, index)
        added = time.perf_counter()
        jobs.add_to_sum(ws, ref)  # a part's add into the running sum, on its GPU worker's host (streamed volumes)
        refs.append(ref)
        reads.append(read)
        writes.append(write + time.perf_counter() - added)
    hosts = [r + w for r, w in zip(reads, writes, strict=True)]
    started = time.perf_counter()
    jobs.merge(ws, refs, path, out)
    merge = time.perf_counter() - started
    return {"prepare_s": round(prepare, 3), "planned_s": round(planned, 3), "first_part_ready_s": round(first_ready, 3),
            "part_host_max_s": round(max(hosts), 3),
            "part_read_max_s": round(max(reads), 3), "part_write_max_s": round(max(writes), 3),
            "merge_s": round(merge, 3),
            "critical_path_s": round(prepare + max(hosts) + merge, 3), "windows": len(prepared.plan.starts),
            "parts": len(prepared.slabs)}


def bundle_shapes(text: str) -> list[tuple[int, int, int]]:
    """``512x512x110,512x512x300`` as shapes; ``none`` (or nothing) as no bundle arm."""
    if text.strip().lower() in ("", "none"):
        return []
    shapes = []
    for item in text.split(","):
        parts = item.lower().split("x")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise argparse.ArgumentTypeError(f"{item!r} is not a shape like 512x512x110")
        shapes.append((int(parts[0]), int(parts[1]), int(parts[2])))
    return shapes


def _timed_steps(transforms: Sequence[Any], data: Any, prefix: str, run: dict[str, Any]) -> Any:
    """``data`` through each transform in turn, each one's seconds in ``run`` (and their sum)."""
    total = 0.0
    for index, transform in enumerate(transforms):
        started = time.perf_counter()
        data = transform(data)
        seconds = time.perf_counter() - started
        run[f"{prefix}.{index}.{type(transform).__name__}_s"] = round(seconds, 4)
        total += seconds
    run[f"{prefix}.steps_total_s"] = round(total, 4)
    return data


def smooth_logits(shape: Sequence[int], seed: int = 0) -> Any:
    """Two channels of smooth made-up logits (C, X, Y, Z) float32: what segq's merge hands the postprocessing
    (its values only decide which label wins, not how long the transforms take)."""
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)
    small = torch.from_numpy(rng.standard_normal((1, 2, *[max(2, s // 16) for s in shape]), dtype=np.float32))
    return torch.nn.functional.interpolate(small * 4, size=tuple(shape), mode="trilinear")[0].numpy()


def bundle_case(spec: Any, path: Path, root: Path) -> dict[str, Any]:
    """One CT through the bundle's preprocessing and inversion as segq runs them, each transform timed."""
    import torch

    from segq.pipeline import bundle_stages

    run: dict[str, Any] = {}
    # the transforms as segq instantiates them (its policy, SaveImaged dropped)
    key, pre, _post = bundle_stages.sections(spec)
    data = _timed_steps(pre.transforms, {key: str(path)}, "pre", run)
    stepwise = data[key]
    started = time.perf_counter()
    model_grid, meta, operations = bundle_stages.preprocess_case(spec, [path])
    run["preprocess_case_s"] = round(time.perf_counter() - started, 4)
    run["model_grid_shape"] = list(model_grid.shape)
    run["preprocess_equal_to_steps"] = bool(torch.equal(torch.as_tensor(model_grid), stepwise.as_tensor().float()))
    ws = root / "bundle-ws"
    ws.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    bundle_stages.save_context(ws, meta, operations)
    run["trace_save_s"] = round(time.perf_counter() - started, 4)
    run["trace_bytes"] = (ws / "trace.json").stat().st_size
    del stepwise, data

    logits = smooth_logits(model_grid.shape[1:])
    import nibabel as nib

    scan_shape = tuple(nib.load(str(path)).shape[:3])
    started = time.perf_counter()
    item, post = bundle_stages.postprocess_inputs(spec, logits.copy(), bundle_stages.load_context(ws))
    run["trace_load_s"] = round(time.perf_counter() - started, 4)
    item = _timed_steps(post.transforms, item, "post", run)
    stepwise_labels = item[bundle_stages.PRED_KEY]
    started = time.perf_counter()
    labels = bundle_stages.postprocess(spec, logits, bundle_stages.load_context(ws), scan_shape).numpy()
    run["postprocess_s"] = round(time.perf_counter() - started, 4)
    run["label_map_shape"] = list(labels.shape)
    # what segq's whole functions add to the transforms: the Compose's own dispatch, and for postprocess reading
    # the trace back and building the MetaTensors
    run["preprocess_overhead_s"] = round(run["preprocess_case_s"] - run["pre.steps_total_s"], 4)
    run["postprocess_overhead_s"] = round(run["postprocess_s"] - run["post.steps_total_s"], 4)
    run["postprocess_equal_to_steps"] = bool(
        (stepwise_labels.detach().cpu().numpy().reshape(labels.shape) == labels).all())
    return run


def bundle_records(args: argparse.Namespace, root: Path, out: Path | None, paths: list[Path]) -> None:
    """Each bundle CT ``--repeats`` times; medians after the first repeat, as the other records."""
    import torch

    from bench.bundle_dataset import write_bundle
    from segq.pipeline.bundle_stages import load_bundle

    if args.threads:
        torch.set_num_threads(args.threads)
    bundle = root / "spleen_ct_segmentation"
    if not (bundle / "models" / "model.pt").is_file():
        write_bundle(bundle, None, 0.1)  # the weights do not enter these timings
    spec = load_bundle(bundle)
    for shape, path in zip(args.bundle_shapes, paths, strict=True):
        runs = [bundle_case(spec, path, root) for _ in range(args.repeats)]
        steady = runs[1:] or runs
        record: dict[str, Any] = {"bench": "volume_costs", "volume": f"bundle-spleen-ct{shape[2]}",
                                  "bundle": "spleen_ct_segmentation", "shape": list(shape), "dtype": "int16",
                                  "spacing": [0.78, 0.78, 2.5], "label": args.label, "cores": os.cpu_count(),
                                  "torch_threads": torch.get_num_threads(), "runs": runs}
        for key in runs[0]:
            if key.endswith("_s"):
                record[f"median_{key}"] = round(statistics.median(r[key] for r in steady), 4)
        emit(record, out)
        pre = ", ".join(f"{k.split('.')[2][:-2]} {record['median_' + k]:.3f}" for k in runs[0]
                        if k.startswith("pre.") and k.count(".") == 2)
        post = ", ".join(f"{k.split('.')[2][:-2]} {record['median_' + k]:.3f}" for k in runs[0]
                         if k.startswith("post.") and k.count(".") == 2)
        logger.info("bundle CT %s: preprocessing %s s (whole %.3f s); inversion %s s (whole %.3f s); medians after "
                    "the first repeat", "x".join(map(str, shape)), pre, record["median_preprocess_case_s"], post,
                    record["median_postprocess_s"])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--volumes", default="ct,brats", help=f"Which of {', '.join(VOLUMES)} to run (none: none).")
    parser.add_argument("--bundle-shapes", type=bundle_shapes, default=bundle_shapes("512x512x110"),
                        help="CTs for the bundle's per-transform times, e.g. 512x512x110,512x512x300; none to skip.")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for the bundle's transforms.")
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
    kinds = [k for k in args.volumes.split(",") if k and k != "none"]
    for kind in kinds:  # all made first: make_volumes forks, which must happen before torch starts its threads
        shape, dtype = VOLUMES[kind]
        if not (data / f"{kind}000.nii.gz").exists():
            peer_folder.make_volumes(data, 1, shape, seed=7, dtype=dtype, prefix=kind)
    bundle_cts = []
    for shape in args.bundle_shapes:
        from bench.bundle_dataset import make_cases

        name = "x".join(map(str, shape))
        path = data / f"bundle-{name}" / "imagesTs" / "ct000.nii.gz"
        if not path.exists():
            make_cases(data / f"bundle-{name}", 1, shape, (0.78, 0.78, 2.5), seed=7)
        bundle_cts.append(path)
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
    if bundle_cts:
        bundle_records(args, root, out, bundle_cts)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    run_in_tempdir("segq-volume-costs-", run, args, logger)


if __name__ == "__main__":
    main()
