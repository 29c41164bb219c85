"""A DICOM series through a job: load it for prepare, and write its mask as NIfTI and/or DICOM SEG in merge.

prepare leaves ``series.json`` in the workspace (the files, the grid's affine, the output format and the
segment description); merge finds it there, so the tasks pass nothing new. The SEG is written with
highdicom: binary, one segment, referencing the source series, each source instance and the Frame of
Reference, with its label and codes from the model file.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segq import storage
from segq.dicom import load_series, read_datasets, series_sha256
from segq.errors import InputError
from segq.modelspec import parse_code, spec_from_dict
from segq.records import JobView
from segq.settings import Settings
from segq.volumes import VolumeHeader

logger = logging.getLogger("segq.dicomseg")

META = "series.json"
SEG_SERIES_NUMBER = 9901  # far from a scanner's own series numbers


@dataclass(frozen=True)
class SeriesMeta:
    files: list[str]
    ras_affine: list[list[float]]  # (column, row, slice) -> RAS: the NIfTI mask's affine
    lps_affine: list[list[float]]  # (slice, row, column) -> LPS: highdicom's grid of the same voxels
    frame_of_reference_uid: str | None
    output_format: str
    segment: list[str]  # label, category, type
    algorithm: list[str]  # name, version

    @property
    def writes_nifti(self) -> bool:
        return self.output_format in ("nifti", "both")

    @property
    def writes_seg(self) -> bool:
        return self.output_format in ("dicom-seg", "both")


def _check_files(job: JobView, settings: Settings) -> list[Path]:
    """The series' files, resolved: inside the allowed roots and, together, still the content submitted."""
    files = [storage.require_allowed(Path(f), settings.allowed_root_paths, "input") for f in job.source_files]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise InputError(f"series {Path(job.input_path).name}: {len(missing)} file(s) gone since submit, "
                         f"e.g. {missing[0]}: submit it again")
    if job.input_sha256 and series_sha256(files) != job.input_sha256:
        raise InputError(f"series {Path(job.input_path).name} changed since it was submitted (its content hash "
                         f"is no longer {job.input_sha256[:12]}...): submit it again")
    return files


def prepare_series(job: JobView, settings: Settings, ws: Path) -> tuple[np.ndarray, VolumeHeader]:
    """The series as a (1, columns, rows, slices) float32 volume; writes what merge needs beside it."""
    spec = spec_from_dict(job.model)
    if spec.in_channels != 1:
        raise InputError(f"series {Path(job.input_path).name}: one greyscale series is one channel, but the "
                         f"model expects {spec.in_channels}")
    loaded = load_series(_check_files(job, settings))
    shape = tuple(int(s) for s in loaded.volume.shape)
    if int(np.prod(shape)) > settings.max_voxels:
        raise InputError(f"series {Path(job.input_path).name}: {shape} is above SEGQ_MAX_VOXELS")
    if not (np.isfinite(loaded.volume.min()) and np.isfinite(loaded.volume.max())):
        raise InputError(f"series {Path(job.input_path).name}: the decoded voxels hold NaN or infinite values")
    meta = SeriesMeta(list(job.source_files), loaded.affine.tolist(), loaded.lps_affine.tolist(),
                      loaded.frame_of_reference_uid, job.output_format,
                      [spec.segment_label, spec.segment_category, spec.segment_type],
                      [f"segq {spec.arch}", job.model_sha256[:16] or "unknown"])
    ws.mkdir(parents=True, exist_ok=True)
    with storage.atomic_path(ws / META, durable=False) as tmp:
        tmp.write_text(json.dumps(asdict(meta)))
    spacing = tuple(float(s) for s in np.linalg.norm(loaded.affine[:3, :3], axis=0))
    return loaded.volume[None], VolumeHeader(shape, spacing, "float32")  # type: ignore[arg-type]


def read_meta(ws: Path) -> SeriesMeta | None:
    """What prepare recorded about the job's DICOM series; None for a NIfTI input."""
    path = ws / META
    return SeriesMeta(**json.loads(path.read_text())) if path.is_file() else None


def nifti_source(meta: SeriesMeta) -> Any:
    """An image carrying the series' affine, standing in for the NIfTI input whose header the mask copies."""
    import nibabel as nib

    image = nib.Nifti1Image(np.zeros((1, 1, 1), np.uint8), np.asarray(meta.ras_affine))
    image.header.set_qform(image.affine, code=1)  # scanner coordinates, as dcm2niix writes them
    image.header.set_sform(image.affine, code=1)
    return image


def _code(text: str) -> Any:
    from highdicom.sr import CodedConcept

    value, scheme, meaning = parse_code(text)
    return CodedConcept(value, scheme, meaning)


def build_seg(mask: np.ndarray, meta: SeriesMeta) -> Any:
    """The mask (columns, rows, slices) as a binary highdicom Segmentation of the source series."""
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    sources = read_datasets([Path(f) for f in meta.files], pixels=False)
    # back to highdicom's (slice, row, column): free for a Fortran-ordered mask, as merge passes it
    grid = np.ascontiguousarray(mask.transpose(2, 1, 0), dtype=np.uint8)
    volume = hd.Volume(grid, np.asarray(meta.lps_affine), coordinate_system="PATIENT",
                       frame_of_reference_uid=meta.frame_of_reference_uid)
    label, category, kind = meta.segment
    name, version = meta.algorithm
    algorithm = hd.AlgorithmIdentificationSequence(name=name, version=version,
                                                   family=codes.cid7162.ArtificialIntelligence)
    segment = hd.seg.SegmentDescription(
        segment_number=1, segment_label=label, segmented_property_category=_code(category),
        segmented_property_type=_code(kind), algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm)
    source_series = str(sources[0].SeriesInstanceUID)
    # The same series through the same model gives the same UIDs: a re-run replaces, it does not add.
    return hd.seg.Segmentation(
        source_images=sources, pixel_array=volume, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        series_instance_uid=generate_uid(entropy_srcs=[source_series, version, "segq-seg-series"]),
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=generate_uid(entropy_srcs=[source_series, version, "segq-seg-instance"]),
        instance_number=1, manufacturer="segq", manufacturer_model_name=name, software_versions=_version(),
        device_serial_number="0", content_label="SEGQ", content_description=label[:64],
        series_description=f"segq {label}"[:64])


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("segq")
    except PackageNotFoundError:
        return "0"


def write_seg(mask: np.ndarray, meta: SeriesMeta, output: Path, names: dict[int, str] | None = None) -> None:
    """Write the SEG atomically (temp name, fsync, rename)."""
    seg = build_seg(mask, meta)
    with storage.atomic_path(output) as tmp:
        seg.save_as(tmp)
