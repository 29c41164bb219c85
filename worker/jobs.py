"""The three steps of a job as plain functions: prepare, run one slab, merge. Tasks call these."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from segq import clock, faults, storage
from segq.errors import CancelledError, DiskFullError, InputError
from segq.modelspec import ModelSpec, files_sha256, spec_from_dict
from segq.records import JobView
from segq.settings import Settings, get_settings
from segq.tiling import (
    Slab,
    WindowPlan,
    importance_map,
    part_windows,
    partial_bytes,
    plan_windows,
    weight_sum,
)
from segq.volumes import load_volume, read_header
from worker import accumulator, streaming, submitted
from worker.inputrows import InputRows, normalise, sum_bytes, zscore_stats

if TYPE_CHECKING:  # the Protocol imports torch, which a coordinator loads only when it needs it
    from worker.engines.base import Engine

logger = logging.getLogger("segq.jobs")

# The padded input as (C, Z, Y, X), C-ordered: each channel in NIfTI's own order (x fastest), so the
# coordinator never transposes a volume; load_input gives the (C, X, Y, Z) view every index uses.
INPUT = "input_zyx.npy"
# The input as (C, X, Y, Z), C-ordered: a bundle's model-grid array (MONAI's order), and what segq wrote
# before the NIfTI-order workspace (a job prepared then still runs).
CXYZ_INPUT = "input.npy"
# A bundle's one-part case as its readers left it, on its own grid (C, X, Y, Z): its GPU worker preprocesses it.
SOURCE_INPUT = "source.npy"
PLAN = "plan.json"


# A volume in one part: its label map, decided by the GPU worker that ran it (see run_slab).
DECIDED = "labels.npy"


def slab_file(index: int, divided: bool = True) -> str:
    """A part's partial: divided by its rows' summed weights on the device (``part_``), or as segq wrote it
    before, a plain weighted sum that merge divides (``slab_``). The name says which, for a redelivery."""
    return f"part_{index:04d}.npy" if divided else f"slab_{index:04d}.npy"


@dataclass(frozen=True)
class Prepared:
    """A volume's plan, in the workspace; ``stream(cancelled)``, when set, writes its input there row by row (the
    caller sends the parts first: see worker/streaming.py)."""

    plan: WindowPlan
    slabs: list[Slab]
    shape: list[int]
    spacing: list[float]
    seconds: float
    stream: Callable[[Callable[[], bool] | None], None] | None = field(default=None, compare=False)


def preprocess(volume: np.ndarray, method: str, inplace: bool = False) -> np.ndarray:
    """The network's input: a C-ordered float32 copy of the channel-first ``volume``, normalised by ``method``;
    with ``inplace``, a C-contiguous ``volume`` is normalised itself instead of copied.

    ``zscore`` is segq.preprocess.zscore_nonzero channel by channel (the training's own definition), computed
    with torch's threaded kernels in a pass for the statistics and one in place: on a 512x512x300 CT the
    numpy version's masked copy and four float64 passes were half of a coordinator's time on the volume.
    """
    import torch

    data = torch.from_numpy(np.asarray(volume, dtype=np.float32))
    out = (data if inplace else data.clone()) if data.is_contiguous() else data.contiguous()
    if method != "zscore":
        return out.numpy()
    normalise(out, zscore_stats(out))
    return out.numpy()


@contextmanager
def checked_input(job: JobView, settings: Settings) -> Iterator[Path]:
    """The input, resolved and still inside the allowed roots, for the body to read; on leaving, it must still
    be the file that was submitted.

    Its sha256 is computed in a thread while the body loads it (hashlib releases the GIL): a CT's hash is
    otherwise a tenth of its prepare, ahead of everything else. A file that changed is reported as changed,
    also when the body failed to read it; a hash `segq submit` had not recorded yet is waited for here, before
    anything of the volume is written (worker/submitted.py).
    """
    files = case_files(job, settings)
    path = files[0]
    if not job.input_sha256:
        yield path
        return
    before = submitted.state_or_none(files)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="segq-input-hash") as pool:
        digest = pool.submit(files_sha256, files)
        try:
            yield path
        except InputError:
            submitted.require_submitted(job, digest.result(), files, before, settings)
            raise
        submitted.require_submitted(job, digest.result(), files, before, settings)


def case_files(job: JobView, settings: Settings) -> list[Path]:
    """The case's files in channel order (one, or a multi-file case's), each still inside the allowed roots."""
    names = job.channel_files or (job.input_path,)
    return [storage.require_allowed(Path(name), settings.allowed_root_paths, "input") for name in names]


def check_output(job: JobView, settings: Settings) -> None:
    """Just before writing: the output still lands inside the dataset's output directory and the allowed roots."""
    if job.out_dir:
        storage.require_output_inside(Path(job.output_path), Path(job.out_dir), settings.allowed_root_paths)


def f_order(array: np.ndarray) -> np.ndarray:
    """A Fortran-ordered copy, NIfTI's order on disk, by torch's multithreaded copy.

    Given a C-ordered array nibabel transposes it slice by slice while writing; given this, it writes
    large contiguous blocks (merge of a 512x512x300 mask: 2.2 s -> 1.6 s on a 2-core machine).
    """
    if array.flags.f_contiguous:
        return array
    import torch

    reverse = tuple(reversed(range(array.ndim)))
    return torch.from_numpy(array).permute(*reverse).contiguous().numpy().transpose(reverse)


# Bytes per voxel and channel that preparing (or merging) a volume holds at its peak: the float32 volume,
# its C-ordered copy and the padded copy, plus the file's own voxels while they are converted.
PEAK_FLOAT_COPIES = 3


def memory_headroom() -> int | None:
    """Bytes this process may still allocate under its address-space limit (ulimit -v) and its cgroup's
    memory.max, whichever is smaller; None when neither limits it."""
    import resource

    limits = []
    soft, _hard = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        status = Path("/proc/self/status").read_text()
        size_kb = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmSize:")), 0)
        limits.append(soft - size_kb * 1024)
    cgroup = Path("/sys/fs/cgroup")
    try:
        high = (cgroup / "memory.max").read_text().strip()
        if high != "max":
            limits.append(int(high) - int((cgroup / "memory.current").read_text()))
    except (OSError, ValueError):
        pass  # no cgroup v2 here
    return min(limits) if limits else None


def check_memory(path: Path, shape: tuple[int, ...], itemsize: int, headroom: int | None) -> None:
    """Refuse, before reading a voxel, a volume whose preparation cannot fit in this worker's memory limit.

    An allocation past the limit raises MemoryError deep inside numpy; refused here it fails this volume
    alone, with the figures, and the worker goes on with the next one.
    """
    voxels = int(np.prod(shape, dtype=np.int64))
    need = voxels * (4 * PEAK_FLOAT_COPIES + itemsize)
    if headroom is not None and need > headroom:
        raise InputError(f"{path}: a {'x'.join(map(str, shape))} volume needs about {need / 2**30:.1f} GiB to "
                         f"prepare; this worker has {max(headroom, 0) / 2**30:.1f} GiB left under its memory limit "
                         "(ulimit -v or cgroup): run it on a worker with more memory, or crop or split the volume")


def prepare(job: JobView, settings: Settings, parts: Callable[[int], int]) -> Prepared:
    """Load, check and preprocess the volume; write the padded array and the window plan to the workspace.

    ``parts(windows)`` says into how many GPU parts the volume is cut (segq.scheduler.split_parts).
    """
    started = time.perf_counter()
    spec = spec_from_dict(job.model)
    faults.point("in_prepare", input=Path(job.input_path).name)
    ws = storage.workspace(settings.storage_root, job.id, job.attempt)
    if spec.is_bundle:
        return prepare_bundle_case(job, settings, parts, spec, ws, started)
    phases = clock.Phases()
    if job.source_files:  # a DICOM series
        from worker.dicomseg import prepare_series

        volume, header = prepare_series(job, settings, ws)
    else:
        with checked_input(job, settings) as path:
            header = read_header(path, settings.max_voxels)
            shape = (*header.shape[:3], len(job.channel_files)) if job.channel_files else header.shape
            check_memory(path, shape, np.dtype(header.dtype).itemsize, memory_headroom())
            phases.mark("header")
            volume, header = load_case(job, settings, path, spec.in_channels, header)
            phases.mark("load")
    phases.mark("hash checked")
    plan = plan_windows(volume.shape[1:], spec.roi, spec.overlap, spec.mode)
    input_bytes = volume.shape[0] * int(np.prod(plan.padded_shape)) * np.dtype(np.float32).itemsize
    sized = functools.partial(cut, plan, stream_ratio=settings.stream_ratio, cap=window_cap(job, settings))
    slabs = kept_slabs(ws, plan) or split_to_fit(plan, parts(len(plan.starts)), input_bytes,
                                                 lambda cut: partial_bytes(plan, cut) + sum_bytes(plan, cut),
                                                 settings.storage_root, job.input_path, split=sized)
    ws.mkdir(parents=True, exist_ok=True)
    phases.mark("plan")
    if len(slabs) > 1:  # streamed: the parts are sent first, then the rows written in the order they start
        stream = streamed_input(ws, (volume.shape[0], *plan.padded_shape), slabs, InputRows(volume, plan,
                                                                                             spec.preprocess))
        _save_plan(ws, plan, slabs, header.shape[:3], stream=True, accumulate=True)
        phases.mark("workspace")
        logger.info("job %s prepared for streaming: %s", job.id, phases.line())
        return Prepared(plan, slabs, list(header.shape[:3]), list(header.spacing), time.perf_counter() - started,
                        stream)
    zyx = workspace_input(volume, plan, spec.preprocess, inplace=volume.flags.writeable)
    phases.mark("normalise")
    storage.save_array(ws / INPUT, zyx)
    phases.mark("input written")
    document: dict[str, Any] = {"plan": plan.to_json(), "slabs": [s.to_json() for s in slabs]}
    if not job.params.get("save_probabilities"):  # no probability map wanted: the GPU worker thresholds it there
        document["decide"] = True
    with storage.atomic_path(ws / PLAN) as tmp:
        tmp.write_text(json.dumps(document))
    logger.info("job %s prepared: %s", job.id, phases.line())
    return Prepared(plan, slabs, list(header.shape[:3]), list(header.spacing), time.perf_counter() - started)


def kept_slabs(ws: Path, plan: WindowPlan) -> list[Slab] | None:
    """The parts of a streamed plan already in the workspace for this very grid: a prepare delivered again (its
    worker died mid-stream) keeps them, so parts already sent, and the rows they wait for, still mean the same."""
    try:
        document = json.loads((ws / PLAN).read_text())
    except FileNotFoundError:
        return None
    if not document.get("stream") or WindowPlan.from_json(document["plan"]) != plan:
        return None
    return [Slab.from_json(s) for s in document["slabs"]]


def streamed_input(ws: Path, shape: tuple[int, ...], slabs: list[Slab], fill: Callable[[np.ndarray, int, int], None],
                   nifti_order: bool = True) -> Callable[[Callable[[], bool] | None], None]:
    """Create the input file for ``shape`` (C, X, Y, Z) now (``INPUT`` in NIfTI's order, else ``CXYZ_INPUT``); the
    writer returned has ``fill`` write it chunk by chunk in slab order, marking each ready (worker/streaming.py)."""
    channels, *spatial = shape
    path, file_shape = ((ws / INPUT, (channels, *reversed(spatial))) if nifti_order else (ws / CXYZ_INPUT, shape))
    streaming.create_input(path, file_shape, np.dtype(np.float32))
    bounds = streaming.chunk_bounds(slabs, shape[1])

    def stream(cancelled: Callable[[], bool] | None = None) -> None:
        streaming.write_rows(ws, path, file_shape, bounds, fill, nifti_order, cancelled)

    return stream


def load_case(job: JobView, settings: Settings, path: Path, channels: int, header: Any) -> tuple[np.ndarray, Any]:
    """A case's channels as one (C, X, Y, Z) volume: one file's, or a multi-file case's stacked in order (with
    ``header``, its first file's)."""
    if not job.channel_files:
        volume, _affine, header = load_volume(path, channels, settings.max_voxels, settings.inflate_threads)
        return volume, header
    volumes = [load_volume(f, 1, settings.max_voxels, settings.inflate_threads)[0] for f in case_files(job, settings)]
    if len(volumes) != channels:
        raise InputError(f"{path}: the case has {len(volumes)} channel files; the model takes {channels}")
    return np.concatenate(volumes, axis=0), header


def prepare_bundle_case(job: JobView, settings: Settings, parts: Callable[[int], int], spec: ModelSpec, ws: Path,
                        started: float) -> Prepared:
    """A bundle's case: its preprocessing onto the model's grid; the padded array, the plan and the trace that
    inverts it go to the workspace.

    A case that goes in one part (every dataset volume while there is a backlog) is only read here: the rest of
    its preprocessing runs on its GPU worker (:func:`run_on_device`), where it takes milliseconds, not the
    seconds of a coordinator's CPU. SEGQ_BUNDLE_PREPROCESS=coordinator keeps all of it here.
    """
    from segq.pipeline import bundle_stages

    ws.mkdir(parents=True, exist_ok=True)
    files, header = _bundle_case_files(job, settings, ws)
    deferred = settings.bundle_preprocess == "auto" and bool(bundle_stages.split_preprocessing(spec)[1])
    read = bundle_stages.read_case(spec, files) if deferred else None
    if read is not None:
        array, meta, operations = read
        grid = bundle_stages.estimated_grid(spec, np.asarray(meta["affine"]), array.shape[1:])
        plan = plan_windows(grid, spec.roi, spec.overlap, spec.mode, spec.sigma_scale)
        partials = functools.partial(bundle_partial_bytes, plan, spec, settings, header.shape[:3])
        slabs = split_to_fit(plan, parts(len(plan.starts)), array.nbytes, partials, settings.storage_root,
                             job.input_path)
        if len(slabs) == 1:
            storage.save_array(ws / SOURCE_INPUT, array)
            bundle_stages.save_context(ws, meta, operations)
            _save_plan(ws, plan, slabs, header.shape[:3], deferred=True)
            return Prepared(plan, slabs, list(header.shape[:3]), list(header.spacing), time.perf_counter() - started)
    model_grid, meta, operations = bundle_stages.preprocess_case(spec, files)
    plan = plan_windows(model_grid.shape[1:], spec.roi, spec.overlap, spec.mode, spec.sigma_scale)
    input_bytes = model_grid.shape[0] * int(np.prod(plan.padded_shape)) * model_grid.dtype.itemsize
    slabs = kept_slabs(ws, plan) or split_to_fit(
        plan, parts(len(plan.starts)), input_bytes,
        functools.partial(bundle_partial_bytes, plan, spec, settings, header.shape[:3]), settings.storage_root,
        job.input_path)
    padded = pad_model_grid(model_grid, plan, spec)
    bundle_stages.save_context(ws, meta, operations)
    if len(slabs) > 1 and padded.dtype == np.float32:  # streamed, as a model.toml's volume (see prepare)
        stream = streamed_input(ws, padded.shape, slabs, functools.partial(_copy_rows, padded), nifti_order=False)
        _save_plan(ws, plan, slabs, header.shape[:3], stream=True)
        return Prepared(plan, slabs, list(header.shape[:3]), list(header.spacing), time.perf_counter() - started,
                        stream)
    storage.save_array(ws / CXYZ_INPUT, padded)
    _save_plan(ws, plan, slabs, header.shape[:3])
    return Prepared(plan, slabs, list(header.shape[:3]), list(header.spacing), time.perf_counter() - started)


def _copy_rows(source: np.ndarray, view: np.ndarray, a: int, b: int) -> None:
    """Rows ``[a, b)`` of a bundle's padded model grid into the streamed file's view."""
    view[:, a:b] = source[:, a:b]


def _bundle_case_files(job: JobView, settings: Settings, ws: Path) -> tuple[list[Path], Any]:
    """The files a bundle's readers take for ``job`` (checked), and the header of the first."""
    if job.source_files:  # a DICOM series: the bundle's LoadImaged reads it as the NIfTI prepare writes
        from worker.dicomseg import nifti_source, prepare_series, read_meta

        series_volume, header = prepare_series(job, settings, ws)
        meta = read_meta(ws)
        assert meta is not None
        files = [ws / "series.nii"]
        _write_nifti(series_volume[0], nifti_source(meta), files[0])
        return files, header
    with checked_input(job, settings) as path:
        files = case_files(job, settings)
        header = read_header(path, settings.max_voxels)
        shape = (*header.shape[:3], len(files)) if len(files) > 1 else header.shape
        check_memory(path, shape, np.dtype(header.dtype).itemsize, memory_headroom())
        for other in files[1:]:
            read_header(other, settings.max_voxels)
    return files, header


def pad_model_grid(model_grid: Any, plan: WindowPlan, spec: ModelSpec) -> Any:
    """The model-grid array (numpy, or a torch tensor on its device) padded as the bundle's inferer pads."""
    if not any(a or b for a, b in plan.pad):
        return model_grid
    from segq.pipeline import bundle

    if isinstance(model_grid, np.ndarray):
        mode = bundle.PADDING_MODES[spec.padding_mode]
        return np.pad(model_grid, ((0, 0), *plan.pad), mode=mode)  # type: ignore[call-overload]
    import torch

    widths = [w for pair in reversed(plan.pad) for w in pair]  # torch pads the last axis first
    return torch.nn.functional.pad(model_grid[None], widths, mode=spec.padding_mode)[0]


def _save_plan(ws: Path, plan: WindowPlan, slabs: list[Slab], source: tuple[int, ...], deferred: bool = False,
               stream: bool = False, accumulate: bool = False) -> None:
    """The plan for the parts; ``stream``: they wait for their rows (worker/streaming.py); ``accumulate``: each
    adds its partial to the workspace's running sum (worker/accumulator.py)."""
    document: dict[str, Any] = {"plan": plan.to_json(), "slabs": [s.to_json() for s in slabs],
                                "source_shape": list(source)}
    if deferred:  # the plan is an estimate; the GPU worker plans the case's windows on its own grid
        document["deferred"] = True
    if stream:
        document["stream"] = True
    if accumulate:
        document["accumulate"] = True
    with storage.atomic_path(ws / PLAN) as tmp:
        tmp.write_text(json.dumps(document))


def bundle_partial_bytes(plan: WindowPlan, spec: ModelSpec, settings: Settings, source: tuple[int, ...],
                         slabs: list[Slab]) -> int:
    """A bundle's partials: every output channel in SEGQ_PARTIAL_DTYPE; a volume in one part writes only its label
    map instead, on the scan's own grid (counted at 8 bytes a voxel, the widest a label map is stored in)."""
    if len(slabs) == 1:
        return int(np.prod(source)) * 8
    return partial_bytes(plan, slabs, spec.out_channels, np.dtype(settings.partial_dtype).itemsize)


def window_cap(job: JobView, settings: Settings) -> int:
    """The most windows one part of ``job`` may hold: its dataset's --max-windows-per-subtask, or the setting's."""
    return int(job.params.get("max_windows_per_subtask") or settings.max_windows_per_subtask)


def cut(plan: WindowPlan, count: int, stream_ratio: float = 0.0, cap: int | None = None) -> list[Slab]:
    """The plan in ``count`` parts: equal, or sized so that streamed parts finish together (tiling.part_windows)."""
    windows = len(plan.starts)
    if count < 2 or stream_ratio <= 0 or windows < 2:
        return plan.split(count)
    count = min(count, windows)
    fits = cap is not None and cap * count >= windows  # fewer parts than the cap needs (a full disk): no cap
    return plan.split(count, part_windows(windows, count, stream_ratio, cap if fits else None))


def split_to_fit(plan: WindowPlan, count: int, input_bytes: int, partials: Callable[[list[Slab]], int],
                 root: Path, what: str, free: int | None = None,
                 split: Callable[[int], list[Slab]] | None = None) -> list[Slab]:
    """The plan cut into ``count`` parts, or into fewer when the workspace they need (the padded input and the
    ``partials(slabs)``) does not fit in what is ``free`` on the storage ``root`` (by default what the filesystem
    says); DiskFullError when one part does not fit.

    Small parts overlap, so their partials can need many times the volume (segq.tiling.partial_bytes): found
    here, such a volume runs in fewer parts; found by the writes, it failed part-way through, at the same part
    on every retry.
    """
    free = storage.free_bytes(root) if free is None else free
    whole = plan.split(1)
    if input_bytes + partials(whole) > free:
        raise DiskFullError(
            f"{storage.printable(what)}: its workspace needs about {storage.size_text(input_bytes + partials(whole))} "
            f"on {root} (the padded input {storage.size_text(input_bytes)} and, in one part, its partial "
            f"{storage.size_text(partials(whole))}), and {storage.size_text(free)} is free there: free space on "
            "SEGQ_STORAGE or point it at a larger disk, then `segq retry --failed`")
    split = split or plan.split
    slabs = split(count)
    wanted = need = input_bytes + partials(slabs)
    while need > free:
        slabs = split(len(slabs) - 1)
        need = input_bytes + partials(slabs)
    if len(slabs) < count:
        logger.warning("%s: %d parts would need %s of workspace (their partials overlap), more than the %s free on "
                       "%s; cut into %d part(s) instead (%s)", storage.printable(what), count,
                       storage.size_text(wanted), storage.size_text(free), root, len(slabs), storage.size_text(need))
    return slabs


def workspace_input(volume: np.ndarray, plan: WindowPlan, method: str, inplace: bool = False) -> np.ndarray:
    """The channel-first ``volume`` (C, X, Y, Z) preprocessed and padded as the workspace stores it: (C, Z, Y, X).

    That is NIfTI's order, in which a loaded volume already lies: its transpose is a C-contiguous view, so
    it is normalised (in place if ``inplace``: a loaded volume is the caller's own array) and written as it
    is. Transposing it to (C, X, Y, Z) first was a third of a CT's prepare.
    """
    zyx = preprocess(volume.transpose(0, 3, 2, 1), method, inplace=inplace)
    if any(a or b for a, b in plan.pad):
        zyx = np.pad(zyx, ((0, 0), *reversed(plan.pad)), mode="constant", constant_values=0)
    return zyx


def load_input(ws: Path) -> np.ndarray:
    """The padded input, memory-mapped, as a (C, X, Y, Z) view (in NIfTI's memory order)."""
    if not (ws / INPUT).exists() and (ws / CXYZ_INPUT).exists():
        return storage.load_array(ws / CXYZ_INPUT, mmap=True)
    return storage.load_array(ws / INPUT, mmap=True).transpose(0, 3, 2, 1)


def load_plan(ws: Path) -> tuple[WindowPlan, list[Slab]]:
    document = json.loads((ws / PLAN).read_text())
    return WindowPlan.from_json(document["plan"]), [Slab.from_json(s) for s in document["slabs"]]


def slab_reference(slab: Slab, shape: tuple[int, ...], checksum: str, worker: str,
                   divided: bool = True) -> dict[str, Any]:
    """What crosses Redis for a slab: ids, a checksum and whether it is divided already, never the array."""
    return {"slab": slab.index, "lo": slab.lo, "shape": list(shape), "checksum": checksum, "worker": worker,
            "windows": len(slab.starts), "divided": divided}


def run_slab(ws: Path, index: int, engine: Engine, spec: ModelSpec, batch_size: int, worker: str,
             should_stop: Callable[[], bool] | None = None,
             lease: AbstractContextManager[Any] | None = None, partial_dtype: str = "float32",
             cancelled: Callable[[], bool] | None = None, stall_seconds: float = 120.0) -> dict[str, Any]:
    """Run one slab's windows and write its partial sum; returns the slab's reference. A partial of several
    channels is written as ``partial_dtype``. A streamed input's rows are waited for first (``cancelled`` asked
    meanwhile; StreamStalledError after ``stall_seconds`` without a new row)."""
    from worker.engines.inference import infer_slab

    plan, slabs = load_plan(ws)
    if not 0 <= index < len(slabs):
        raise InputError(f"slab {index} does not exist: the plan has {len(slabs)} slabs")
    slab = slabs[index]
    faults.point("in_infer_slab", slab=index)
    phases = clock.Phases()
    wait_for_input(ws, slab, cancelled, stall_seconds)
    phases.mark("rows waited")
    decided = len(slabs) == 1 and (spec.is_bundle or bool(plan_flags(ws).get("decide")))
    if deferred(ws):
        array, slab = run_on_device(ws, spec, engine, batch_size, should_stop, lease)
    else:
        import torch

        finish = None
        if decided and spec.is_bundle:
            finish = functools.partial(decide_on_device, spec, bundle_context(ws), plan, source_shape(ws))
        elif decided:
            finish = functools.partial(threshold_on_device, plan)
        array = infer_slab(load_input(ws), slab, plan.roi, importance_map(plan), engine, batch_size, should_stop,
                           lease, starts=plan.starts, channels_dtype=getattr(torch, partial_dtype), finish=finish)
    if should_stop is not None and should_stop():
        raise CancelledError(f"slab {index} stopped: the job was cancelled")
    phases.mark("inference")
    checksum = storage.array_checksum(array)
    if decided:
        saved = storage.save_array_once(ws / DECIDED, array)
        phases.mark("label map written")
        logger.info("slab %d of %d, decided: %s", index, len(slabs), phases.line())
        if not saved:
            logger.warning("slab %d: a label map from another delivery is already there; keeping it", index)
            return existing_reference(ws, index, worker) or {}
        return {**slab_reference(slab, array.shape, checksum, worker), "decided": True}
    saved = storage.save_array_once(ws / slab_file(index), array)
    phases.mark("partial written")
    logger.info("slab %d of %d: %s", index, len(slabs), phases.line())
    if not saved:
        # Another delivery of this slab wrote its partial first: that file is what the merge reads and
        # what the chord may already count, so report it, not this run's (possibly last-bit different) one.
        logger.warning("slab %d: a partial from another delivery is already there; keeping it", index)
        return existing_reference(ws, index, worker) or slab_reference(slab, array.shape, checksum, worker)
    return slab_reference(slab, array.shape, checksum, worker)


def plan_flags(ws: Path) -> dict[str, Any]:
    """The plan's document without its windows: ``stream``, ``accumulate``, ``deferred``."""
    document = json.loads((ws / PLAN).read_text())
    return {k: v for k, v in document.items() if k not in ("plan", "slabs")}


def wait_for_input(ws: Path, slab: Slab, cancelled: Callable[[], bool] | None, stall_seconds: float) -> None:
    """Return once the rows ``slab`` reads are in the workspace: at once unless its input is streamed."""
    if plan_flags(ws).get("stream"):
        waited = streaming.wait_for_rows(ws, slab.hi, cancelled, stall_seconds)
        logger.info("slab %d reads rows [%d, %d) at %.6f after waiting %.3f s for them", slab.index, slab.lo,
                    slab.hi, clock.local_time(), waited)
    faults.point("in_read_rows", slab=slab.index, lo=slab.lo, hi=slab.hi, job=ws.parent.name)


def add_to_sum(ws: Path, ref: dict[str, Any]) -> None:
    """Add a finished part's partial to the workspace's running sum, when its plan keeps one (several parts of a
    model.toml volume): merge then only adds what is missing, normally nothing."""
    if not ref or ref.get("decided") or not ref.get("divided") or not plan_flags(ws).get("accumulate"):
        return
    started = time.perf_counter()
    plan, _slabs = load_plan(ws)
    index = int(ref["slab"])
    accumulator.add(ws, plan.padded_shape, accumulator.Part(index, int(ref["lo"]), str(ref["checksum"]),
                                                            slab_file(index)))
    logger.info("slab %d added into the running sum in %.3f s", index, time.perf_counter() - started)


def source_shape(ws: Path) -> tuple[int, ...]:
    """The scan's own grid, which a bundle's label map returns to (prepare records it with the plan)."""
    return tuple(json.loads((ws / PLAN).read_text())["source_shape"])


def deferred(ws: Path) -> bool:
    """Whether the workspace holds a case its GPU worker preprocesses (see prepare_bundle_case)."""
    return bool(plan_flags(ws).get("deferred"))


def bundle_context(ws: Path) -> tuple[dict[str, Any], list[Any]]:
    from segq.pipeline import bundle_stages

    return bundle_stages.load_context(ws)


def run_on_device(ws: Path, spec: ModelSpec, engine: Engine, batch_size: int,
                  should_stop: Callable[[], bool] | None, lease: AbstractContextManager[Any] | None
                  ) -> tuple[np.ndarray, Slab]:
    """A one-part bundle case, from its readers' output to its label map, on the engine's device: the rest of
    the preprocessing, the windows planned on the grid it gives, inference, and the bundle's postprocessing.
    Returns the label map and the part as it ran (its windows counted on the real grid)."""
    from segq.pipeline import bundle_stages
    from worker.engines.inference import infer_rows

    source = storage.load_array(ws / SOURCE_INPUT)  # read before the device is taken
    meta, operations = bundle_stages.load_context(ws)
    started = time.perf_counter()
    with lease or contextlib.nullcontext():
        grid, meta, operations = bundle_stages.preprocess_on_device(spec, source, meta, operations, engine.device)
        plan = plan_windows(tuple(grid.shape[1:]), spec.roi, spec.overlap, spec.mode, spec.sigma_scale)
        slab = plan.split(1)[0]
        logger.info("a case's preprocessing on %s: %.3f s, grid %s", engine.device, time.perf_counter() - started,
                    "x".join(str(n) for n in grid.shape[1:]))
        finish = functools.partial(decide_on_device, spec, (meta, operations), plan, source_shape(ws))
        array = infer_rows(pad_model_grid(grid, plan, spec), slab, plan.roi, importance_map(plan), engine,
                           batch_size, should_stop, starts=plan.starts, finish=finish)
    return array, slab


def decide_on_device(spec: ModelSpec, context: tuple[dict[str, Any], list[Any]], plan: WindowPlan,
                     shape: tuple[int, ...], logits: Any) -> np.ndarray:
    """A bundle's volume run in one part: its postprocessing (activation, Invertd, argmax ...) where its logits are.

    On a GPU worker the transforms run on the device (bench/volume_costs.py: a CT's Invertd and argmax took
    seconds on a coordinator's CPU, milliseconds on the GPU), and only the label map leaves it; merge then
    only writes it. A volume split over several parts is decided by merge, on the coordinator, as before.
    """
    from segq.pipeline import bundle_stages

    crop = (slice(None), *plan.crop)
    return bundle_stages.postprocess(spec, logits[crop], context, shape).cpu().numpy()


def threshold_on_device(plan: WindowPlan, probability: Any) -> np.ndarray:
    """A model.toml's volume run in one part: its target probability thresholded at 0.5 where it lies, as merge
    thresholds the partial (the same float32 values, so the same mask), cropped to the scan's grid. Only the uint8
    mask leaves the device (a quarter of the float32 partial), in NIfTI's order; merge then only writes it."""
    mask = (probability[plan.crop] >= 0.5).byte()
    return mask.permute(2, 1, 0).contiguous().cpu().numpy().transpose(2, 1, 0)


def existing_reference(ws: Path, index: int, worker: str) -> dict[str, Any] | None:
    """The reference of a slab already written by an earlier delivery, if its file is whole."""
    if index == 0 and (ws / DECIDED).is_file():
        _plan, slabs = load_plan(ws)
        array = storage.load_array(ws / DECIDED)
        return {**slab_reference(slabs[0], array.shape, storage.array_checksum(array), worker), "decided": True}
    for divided in (True, False):
        path = ws / slab_file(index, divided)
        if path.is_file():
            _plan, slabs = load_plan(ws)
            array = storage.load_array(path)
            return slab_reference(slabs[index], array.shape, storage.array_checksum(array), worker, divided)
    return None


_WEIGHT_CACHE: OrderedDict[tuple[Any, ...], np.ndarray] = OrderedDict()
_WEIGHT_CACHE_SIZE = 2


def cached_weight_sum(plan: WindowPlan) -> np.ndarray:
    """The plan's summed importance map, kept for the next volume of the same shape: the divisor of a
    partial from an earlier segq (a part now divides its own partial on the device).

    A dataset's volumes usually share one shape (every BraTS case is 240x240x155), and the sum
    costs a pass over the volume per window; two entries bound the memory a coordinator keeps.
    """
    key = (plan.padded_shape, plan.roi, plan.mode, plan.sigma_scale, tuple(plan.starts))
    weights = _WEIGHT_CACHE.get(key)
    if weights is None:
        weights = weight_sum(plan)
        weights.flags.writeable = False
        _WEIGHT_CACHE[key] = weights
        while len(_WEIGHT_CACHE) > _WEIGHT_CACHE_SIZE:
            _WEIGHT_CACHE.popitem(last=False)
    else:
        _WEIGHT_CACHE.move_to_end(key)
    return weights


def _write_nifti(array: np.ndarray, source: Any, output: Path, extension: Any = None) -> None:
    """Write ``array`` as NIfTI beside ``output`` and rename it into place.

    The file handles are ours and closed by ``with`` even when a write fails: given a file name, nibabel
    opens its own, and a full disk's OSError kept it open (through the exception's traceback, which Celery
    keeps), so the unlinked temp file held its space until the worker restarted.
    """
    import nibabel as nib
    from nibabel.fileholders import FileHolder

    header = source.header.copy()
    header.set_data_dtype(array.dtype)
    header.set_data_shape(array.shape)
    image = nib.Nifti1Image(array, source.affine, header)
    image.header.set_slope_inter(1, 0)
    if extension is not None:
        image.header.extensions.append(extension)
    with storage.disk_errors(output), storage.atomic_path(output) as tmp:
        with open(tmp, "wb") as raw:
            if output.name.endswith(".gz"):
                with gzip_stream(raw) as stream:
                    stream.write(image.to_bytes())
            else:
                image.to_file_map({"image": FileHolder(fileobj=raw)})
        faults.point("before_merge_rename", output=output.name)


def gzip_stream(raw: Any) -> Any:
    """A writer that deflates into ``raw``: ISA-L's igzip in SEGQ_GZIP_THREADS threads (a CT's mask several
    times faster than zlib), or, with a python-isal older than 1.6 (no igzip_threaded), ISA-L's igzip in this
    thread."""
    from isal import igzip

    threads = get_settings().gzip_threads or min(4, max(2, len(os.sched_getaffinity(0)) // 4))
    try:
        from isal import igzip_threaded
    except ImportError:
        logger.info("python-isal has no igzip_threaded (1.6 or later has it): the mask is deflated in one thread")
        return igzip.open(raw, "wb", compresslevel=1)
    if threads <= 1:
        return igzip.open(raw, "wb", compresslevel=1)
    return igzip_threaded.open(raw, "wb", compresslevel=1, threads=threads)


def outputs_of(output: Path) -> list[Path]:
    """Every file a job's merge may write: the mask, its label sidecar, the probability map and the DICOM SEG."""
    from segq import labelmaps
    from segq.dicom import seg_output

    return [output, labelmaps.sidecar_path(output), storage.probability_path(output), seg_output(output)]


@dataclass(frozen=True)
class MergeResult:
    voxels: int  # every labelled voxel (label > 0)
    ml: float
    labels: list[dict[str, Any]]  # per label: value, name, voxels, ml


def merge(ws: Path, refs: list[dict[str, Any]], input_path: Path, output: Path,
          save_probabilities: bool = False, spec: ModelSpec | None = None) -> MergeResult:
    """Add the partials and decide: a model.toml's target probability thresholded at 0.5 into a binary mask, or a
    bundle's logits through its own postprocessing into a label map on the scan's grid (unless the GPU worker of
    a one-part volume decided it already). Writes it atomically.

    Returns the labelled voxels and their volume in mL (from the input's voxel spacing), in all and per label.
    For a DICOM series (prepare left its description in ``ws``) the output is NIfTI, DICOM SEG or both.
    """
    import nibabel as nib

    from segq import labelmaps
    from segq.dicom import seg_output
    from worker import dicomseg

    # A merge killed between writing its temp file and renaming it left that file; this delivery is now
    # the output's only writer, so whatever temp file is there is stale.
    for stale in storage.remove_stale_temps(output) + storage.remove_stale_temps(storage.probability_path(output)):
        logger.warning("removed %s, left by a merge that was killed before its rename", stale)
    phases = clock.Phases()
    plan, slabs = load_plan(ws)
    by_slab = {int(r["slab"]): r for r in refs if r}
    missing = sorted(set(range(len(slabs))) - set(by_slab))
    if missing:
        raise InputError(f"merge is missing slab(s) {missing} of {len(slabs)}")
    series = dicomseg.read_meta(ws)
    source = nib.load(str(input_path)) if series is None else dicomseg.nifti_source(series)
    bundle = spec is not None and spec.is_bundle
    if by_slab[0].get("decided"):
        mask = storage.load_array(ws / DECIDED)
        if storage.array_checksum(mask) != by_slab[0]["checksum"]:
            raise InputError(f"the label map in {ws} does not match the checksum its subtask reported")
    else:
        mask = _decide(ws, plan, slabs, by_slab, spec, source, output, save_probabilities)
    phases.mark("decided" if by_slab[0].get("decided") else "partials added")
    names = spec.label_names() if spec is not None else {0: "background", 1: "tumour"}
    ordered = f_order(mask)  # NIfTI's order on disk; its transpose is the SEG's (slice, row, column), copy-free
    extension = labelmaps.nifti_extension(names) if bundle else None
    if series is None or series.writes_nifti:
        _write_nifti(ordered, source, output, extension)
        if bundle:
            labelmaps.write_sidecar(output, names)
    if series is not None and series.writes_seg:
        seg = seg_output(output)
        storage.remove_stale_temps(seg)
        dicomseg.write_seg(ordered, series, seg, names if bundle else None)
    phases.mark("written")
    spacing = float(np.prod(source.header.get_zooms()[:3]))
    stats = labelmaps.label_volumes(mask, names, spacing / 1000.0)
    phases.mark("counted")
    logger.info("merge of %d part(s): %s", len(slabs), phases.line())
    voxels = sum(int(s["voxels"]) for s in stats)
    return MergeResult(voxels, round(voxels * spacing / 1000.0, 4), stats)


def _decide(ws: Path, plan: WindowPlan, slabs: list[Slab], by_slab: dict[int, dict[str, Any]],
            spec: ModelSpec | None, source: Any, output: Path, save_probabilities: bool) -> np.ndarray:
    """The partials added (the workspace's running sum, where the parts kept one), then thresholded (a
    model.toml) or through the bundle's postprocessing."""
    if plan_flags(ws).get("accumulate") and all(by_slab[s.index].get("divided") for s in slabs):
        parts = [accumulator.Part(s.index, s.lo, str(by_slab[s.index]["checksum"]), slab_file(s.index))
                 for s in slabs]
        probability = accumulator.total(ws, plan.padded_shape, parts)[plan.crop]
    else:
        probability = _added_partials(ws, plan, slabs, by_slab)
    if spec is not None and spec.is_bundle:
        from segq.pipeline import bundle_stages

        return bundle_stages.postprocess(spec, probability, bundle_stages.load_context(ws), source_shape(ws)).numpy()
    mask = (probability >= 0.5).view(np.uint8)  # bool is one byte of 0 or 1: no second pass
    if save_probabilities:
        _write_nifti(f_order(probability), source, storage.probability_path(output))
    return mask


def _added_partials(ws: Path, plan: WindowPlan, slabs: list[Slab], by_slab: dict[int, dict[str, Any]]
                    ) -> np.ndarray:
    """Every part's partial read and added at its offset, the padding cropped."""
    from worker.engines.inference import merge_partials

    partials = []
    for slab in slabs:
        divided = bool(by_slab[slab.index].get("divided"))
        # Several parts are only read (added into one sum): map them instead of copying hundreds of MB first.
        array = storage.load_array(ws / slab_file(slab.index, divided), mmap=len(slabs) > 1)
        if storage.array_checksum(array) != by_slab[slab.index]["checksum"]:
            raise InputError(f"slab {slab.index}'s partial in {ws} does not match the checksum its subtask reported")
        if not divided:  # written by a worker of an earlier segq: divide it here
            array = array / cached_weight_sum(plan)[slab.lo : slab.lo + array.shape[0]]
        partials.append((slab.lo, array))
    return merge_partials(plan.padded_shape, partials, plan.crop)
