"""A DICOM series through a job: load it for prepare, and write its mask as NIfTI and/or DICOM SEG in merge.

prepare leaves ``series.json`` in the workspace (the files, the grid's affine, the output format and the
segment description); merge finds it there, so the tasks pass nothing new. The SEG is written with
highdicom: binary, referencing the source series, each source instance and the Frame of Reference. A
model.toml's mask is one segment, with its label and codes from the model file; a bundle's label map is one
segment per label, named from the bundle's metadata, in value order (segment numbers 1..N, as the SEG requires,
whatever the label values), with a generic code (GENERIC_CATEGORY, GENERIC_TYPE) since a bundle names its labels
but does not code them.
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
# A bundle label's codes: pydicom codes.SCT keywords, SCT 85756007 "Tissue" (a category of CID 7150) and
# SCT 91772007 "Organ". Most bundle labels are organs; what a label is exactly, only its name says.
GENERIC_CATEGORY = "Tissue"
GENERIC_TYPE = "Organ"
LO_MAX = 64  # the longest Long String (SegmentLabel, ContentDescription, SeriesDescription)


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


def long_string(text: str) -> str:
    """``text`` as a DICOM Long String: no backslash (the value separator) or control characters, at most
    64 bytes in UTF-8 (what dciodvfy counts; 64 characters for ASCII), cut between characters; a name left
    empty becomes "unnamed"."""
    cleaned = "".join(" " if ch.isspace() or not ch.isprintable() else ch for ch in text.replace("\\", "/"))
    cut = " ".join(cleaned.split()).encode()[:LO_MAX].decode(errors="ignore")
    return cut.strip() or "unnamed"


def segments(mask: np.ndarray, names: dict[int, str]) -> list[tuple[int, str]]:
    """(label value, segment label) per segment, in value order: every named label but the background, empty
    or not, so a label has one segment number across a dataset's SEGs; a value the mask holds that the names
    lack is a segment ``label N``, as in the job's ``labels``."""
    present = np.flatnonzero(np.bincount(mask.ravel(order="K")))
    values = sorted({v for v in names if v > 0} | {int(v) for v in present if v > 0})
    return [(v, long_string(names.get(v, f"label {v}"))) for v in values]


def numbered(grid: np.ndarray, values: list[int]) -> np.ndarray:
    """The label map with each label value replaced by its segment number (1..N, in the order of ``values``)."""
    lookup = np.zeros(max(max(values, default=0), int(grid.max(initial=0))) + 1,
                      np.uint8 if len(values) < 256 else np.uint16)
    lookup[values] = np.arange(1, len(values) + 1)
    return lookup[grid]


def _description(hd: Any, number: int, label: str, category: str, kind: str, algorithm: Any) -> Any:
    return hd.seg.SegmentDescription(
        segment_number=number, segment_label=label, segmented_property_category=_code(category),
        segmented_property_type=_code(kind), algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm)


@dataclass(frozen=True)
class SegContent:
    """What a SEG holds: its pixels on highdicom's (slice, row, column) grid, valued by segment number, and
    the segments' descriptions; the content and series descriptions that name it."""

    grid: np.ndarray
    descriptions: list[Any]
    content: str
    title: str


def seg_content(mask: np.ndarray, meta: SeriesMeta, algorithm: Any, names: dict[int, str] | None) -> SegContent:
    """One segment from the model file's label and codes; with ``names``, one per label (see segments)."""
    import highdicom as hd

    # back to highdicom's (slice, row, column): free for a Fortran-ordered mask, as merge passes it
    grid = np.ascontiguousarray(mask.transpose(2, 1, 0))
    label, category, kind = meta.segment
    if names is None:
        return SegContent(grid.astype(np.uint8, copy=False), [_description(hd, 1, label, category, kind, algorithm)],
                          label[:LO_MAX], f"segq {label}"[:LO_MAX])
    found = segments(mask, names)
    descriptions = [_description(hd, number, text, GENERIC_CATEGORY, GENERIC_TYPE, algorithm)
                    for number, (_, text) in enumerate(found, start=1)]
    return SegContent(numbered(grid, [value for value, _ in found]), descriptions,
                      long_string(", ".join(text for _, text in found)), long_string(f"segq {len(found)} labels"))


def build_seg(mask: np.ndarray, meta: SeriesMeta, names: dict[int, str] | None = None) -> Any:
    """The mask (columns, rows, slices) as a binary highdicom Segmentation of the source series: one segment,
    or with ``names`` (a label map's, by value; 0 the background) one segment per label (see segments)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    sources = read_datasets([Path(f) for f in meta.files], pixels=False)
    name, version = meta.algorithm
    algorithm = hd.AlgorithmIdentificationSequence(name=name, version=version,
                                                   family=codes.cid7162.ArtificialIntelligence)
    parts = seg_content(mask, meta, algorithm, names)
    volume = hd.Volume(parts.grid, np.asarray(meta.lps_affine), coordinate_system="PATIENT",
                       frame_of_reference_uid=meta.frame_of_reference_uid)
    texts = [parts.content, parts.title] + [str(d.SegmentLabel) for d in parts.descriptions]
    # highdicom keeps the source's character set (ASCII when it names none); a label name beyond ASCII needs UTF-8
    charset: dict[str, Any] = {} if all(t.isascii() for t in texts) else {"specific_character_set": "ISO_IR 192"}
    source_series = str(sources[0].SeriesInstanceUID)
    # The same series through the same model gives the same UIDs: a re-run replaces, it does not add.
    return hd.seg.Segmentation(
        source_images=sources, pixel_array=volume, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=parts.descriptions,
        series_instance_uid=generate_uid(entropy_srcs=[source_series, version, "segq-seg-series"]),
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=generate_uid(entropy_srcs=[source_series, version, "segq-seg-instance"]),
        instance_number=1, manufacturer="segq", manufacturer_model_name=name, software_versions=_version(),
        device_serial_number="0", content_label="SEGQ", content_description=parts.content,
        series_description=parts.title, **charset)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("segq")
    except PackageNotFoundError:
        return "0"


def write_seg(mask: np.ndarray, meta: SeriesMeta, output: Path, names: dict[int, str] | None = None) -> None:
    """Write the SEG atomically (temp name, fsync, rename); ``names``: the mask is a label map (see build_seg)."""
    seg = build_seg(mask, meta, names)
    with storage.atomic_path(output) as tmp:
        seg.save_as(tmp)
