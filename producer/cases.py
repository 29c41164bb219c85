"""Cases of several files, one per channel: found by nnU-Net's names, read from a datalist, checked by their headers.

A case comes named the nnU-Net way (``<case>_0000.nii.gz`` to ``_000N``, grouped per directory when the model
takes more than one channel) or listed in a datalist (JSON as MONAI writes it, or CSV). A case whose channel
files are missing, extra or doubled is refused alone, as is one whose files do not share one grid (checked at
submit, from the headers). A done job of a case is named by its case: its output's name without ``_seg.nii.gz``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segq.dicom import Refused
from segq.errors import InputError
from segq.storage import strip_nifti_suffix
from segq.volumes import VolumeHeader, check_channels, read_header

NNUNET_NAME = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})\.nii(\.gz)?$")
DATALIST_SECTIONS = ("testing", "test", "validation", "training")  # the first present is read
NOT_CHANNELS = ("case", "name", "label")  # a datalist's case name and ground truth: never a channel
AFFINE_TOLERANCE_MM = 1e-4  # channels written on one grid agree far closer; a resampled one differs by more
OUTPUT_SUFFIX = "_seg.nii.gz"  # a case's mask: storage.output_path's name for it
_IMAGE_COLUMN = re.compile(r"^image_(\d+)$")


@dataclass(frozen=True)
class Case:
    """A case named by nnU-Net's file names or in a datalist: its files in channel order, as given."""

    name: str
    files: tuple[Path, ...]
    relative: Path  # its output under --out, before ``_seg.nii.gz``
    where: str  # its directory or datalist entry, for messages

    def refused(self, reason: str) -> Refused:
        return Refused(f"case {self.name} ({self.where})", reason)


@dataclass(frozen=True)
class Grouped:
    """Files scanned, sorted: those that are volumes alone (with their relative paths), cases, and refusals."""

    singles: list[tuple[Path, Path]]
    cases: list[Case]
    refused: list[Refused]


def channel_of(name: str) -> tuple[str, int] | None:
    """nnU-Net's ``<case>_<four digits>.nii[.gz]``: the case and the channel, or None for any other name."""
    match = NNUNET_NAME.match(name)
    return (match["case"], int(match["ch"])) if match else None


def group_channels(pairs: list[tuple[Path, Path]], in_channels: int) -> Grouped:
    """One case per directory and nnU-Net case name, for a model of several channels; other files stay alone.

    For a model of one channel every file is a volume of its own, as before (``x_0000.nii.gz`` makes
    ``x_0000_seg.nii.gz``). Names only: the headers are read at submit.
    """
    if in_channels <= 1:
        return Grouped(list(pairs), [], [])
    singles: list[tuple[Path, Path]] = []
    groups: dict[tuple[str, Path, str], list[tuple[int, Path]]] = defaultdict(list)
    for path, relative in pairs:
        found = channel_of(path.name)
        if found is None:
            singles.append((path, relative))
        else:
            groups[(os.path.abspath(path.parent), relative.parent, found[0])].append((found[1], path))
    cases: list[Case] = []
    refused: list[Refused] = []
    for (_, directory, name), channels in groups.items():
        result = _nnunet_case(name, directory, channels, in_channels)
        if isinstance(result, Case):
            cases.append(result)
        else:
            refused.append(result)
    return Grouped(singles, cases, refused)


def _nnunet_case(name: str, directory: Path, channels: list[tuple[int, Path]], in_channels: int) -> Case | Refused:
    by_channel: dict[int, list[Path]] = defaultdict(list)
    for number, path in sorted(channels):
        if path not in by_channel[number]:
            by_channel[number].append(path)
    first = by_channel[min(by_channel)][0]
    case = Case(name, (), directory / name, str(first.parent))
    last = f"_{in_channels - 1:04d}"
    twice = next((paths for paths in by_channel.values() if len(paths) > 1), None)
    if twice is not None:
        return case.refused(f"{twice[0]} and {twice[1].name} are one channel: keep one of them")
    suffix = ".nii.gz" if first.name.endswith(".gz") else ".nii"
    missing = [first.parent / f"{name}_{k:04d}{suffix}" for k in range(in_channels) if k not in by_channel]
    if missing:
        files, verb = ("channel files", "are") if len(missing) > 1 else ("channel file", "is")
        return case.refused(f"{files} {', '.join(str(m) for m in missing)} {verb} missing: the model takes "
                            f"{in_channels} channels, _0000 to {last}; add it, or move the case's files out")
    extra = [by_channel[k][0] for k in sorted(by_channel) if k >= in_channels]
    if extra:
        return case.refused(f"{extra[0]} is one channel too many: the model takes {in_channels} channels, _0000 "
                            f"to {last}; move it out, or use a model that takes it")
    return Case(name, tuple(by_channel[k][0] for k in range(in_channels)), case.relative, case.where)


@dataclass(frozen=True)
class Datalist:
    """A datalist's cases, what was refused of it, and the JSON list read (None: a top-level list, or a CSV)."""

    cases: list[Case]
    refused: list[Refused]
    section: str | None = None


def case_name(first: Path) -> str:
    """A case named by its first file: the name without its NIfTI extension and nnU-Net's ``_0000``."""
    return strip_nifti_suffix(first.name).removesuffix("_0000")


def read_datalist(path: Path) -> Datalist:
    """The cases a datalist file names: JSON as MONAI writes it (``load_decathlon_datalist``) or CSV with a header
    row. Paths are relative to the datalist's folder (absolute ones are kept)."""
    if path.suffix.lower() not in (".json", ".csv"):
        raise InputError(f"datalist {path} is neither a .json nor a .csv file: give one of those")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise InputError(f"datalist {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"datalist {path} cannot be read ({exc}): check its permissions and encoding") from None
    base = path.parent
    if path.suffix.lower() == ".csv":
        return parse_csv_datalist(text, base, path.name)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"datalist {path} is not valid JSON ({exc}): fix it, or write it with MONAI") from None
    return parse_json_datalist(data, base, path.name)


def parse_json_datalist(data: Any, base: Path, source: str) -> Datalist:
    """A list of ``{"image": path | [paths]}`` (or of paths), or a dict holding such a list under "testing", "test",
    "validation" or "training" (the first present). An optional "name" or "case" names the case."""
    section = None
    if isinstance(data, dict):
        section = next((key for key in DATALIST_SECTIONS if key in data), None)
        if section is None:
            raise InputError(f"datalist {source} has none of the lists {', '.join(map(repr, DATALIST_SECTIONS))}: "
                             "put the cases under one of them, or make the file a list of cases")
        data = data[section]
    label = f"{source} {section!r}" if section else source
    if not isinstance(data, list) or not data:
        raise InputError(f"datalist {label} is not a list of cases (it must hold at least one)")
    cases: list[Case] = []
    refused: list[Refused] = []
    for i, entry in enumerate(data):
        where = f"{source} {section or ''}[{i}]".replace(" [", "[")
        result = _json_case(entry, base, where)
        (cases if isinstance(result, Case) else refused).append(result)  # type: ignore[arg-type]
    return _unique(cases, refused, section)


def _json_case(entry: Any, base: Path, where: str) -> Case | Refused:
    entry = {"image": entry} if isinstance(entry, str) else entry
    images = entry.get("image") if isinstance(entry, dict) else None
    files = [images] if isinstance(images, str) else images
    if not isinstance(files, list) or not files or not all(isinstance(f, str) and f for f in files):
        return Refused(f"datalist entry {where}", 'has no "image": give a path, or a list of paths (one per channel)')
    named = entry.get("name", entry.get("case"))
    if named is not None and not isinstance(named, (str, int)):
        return Refused(f"datalist entry {where}", f'its "name" {named!r} is not a string')
    paths = tuple(base / f for f in files)
    name = str(named) if named not in (None, "") else case_name(paths[0])
    return Case(name, paths, Path(name), where)


def channel_columns(header: list[str]) -> list[int]:
    """The CSV columns that hold a case's channels, in channel order: ``image``, or ``image_0`` to ``image_N``,
    or every column but the case name (and a ``label``), left to right."""
    numbered = sorted((int(m[1]), i) for i, h in enumerate(header) if (m := _IMAGE_COLUMN.match(h)))
    if numbered:
        if [n for n, _ in numbered] != list(range(len(numbered))):
            shown = ", ".join(f"image_{n}" for n, _ in numbered)
            raise InputError(f"channel columns {shown} are not numbered image_0 to image_{len(numbered) - 1}")
        return [i for _, i in numbered]
    if "image" in header:
        return [header.index("image")]
    return [i for i, h in enumerate(header) if h.lower() not in NOT_CHANNELS]


def parse_csv_datalist(text: str, base: Path, source: str) -> Datalist:
    """A header row, then a case a row: an optional ``case`` column and the channel columns (channel_columns)."""
    reader = csv.reader(io.StringIO(text))
    header = [h.strip() for h in next(reader, [])]
    try:
        columns = channel_columns(header)
    except InputError as exc:
        raise InputError(f"datalist {source}: {exc}") from None
    if not columns:
        raise InputError(f"datalist {source} has no channel columns in its header row {header}: name them "
                         "image, or image_0 to image_N, beside an optional case column")
    name_at = next((i for i, h in enumerate(header) if h.lower() in ("case", "name")), None)
    cases: list[Case] = []
    refused: list[Refused] = []
    for row in reader:
        cells = [c.strip() for c in row]
        if not any(cells):
            continue
        result = _csv_case(cells, header, columns, name_at, base, f"{source} line {reader.line_num}")
        (cases if isinstance(result, Case) else refused).append(result)  # type: ignore[arg-type]
    if not cases and not refused:
        raise InputError(f"datalist {source} has a header row and no cases")
    return _unique(cases, refused, None)


def _csv_case(cells: list[str], header: list[str], columns: list[int], name_at: int | None, base: Path,
              where: str) -> Case | Refused:
    def cell(i: int) -> str:
        return cells[i] if i < len(cells) else ""

    given = cell(name_at) if name_at is not None else ""
    empty = [header[i] for i in columns if not cell(i)]
    if empty:
        return Refused(f"case {given or '?'} ({where})", f"no file in column {', '.join(empty)}: give every channel")
    paths = tuple(base / cell(i) for i in columns)
    name = given or case_name(paths[0])
    return Case(name, paths, Path(name), where)


def _unique(cases: list[Case], refused: list[Refused], section: str | None) -> Datalist:
    """Two cases of one name would write one output: both are refused, so neither silently wins."""
    counts = Counter(case.name for case in cases)
    for case in cases:
        if counts[case.name] > 1:
            others = ", ".join(c.where for c in cases if c.name == case.name and c is not case)
            refused.append(case.refused(f"{others} has the same case name: give each case its own name "
                                        '("name" key or case column)'))
    return Datalist([c for c in cases if counts[c.name] == 1], refused, section)



def check_case(files: tuple[Path, ...], in_channels: int, max_voxels: int) -> str | None:
    """Why a case's files are not one volume of the model's channels, or None; headers only, no voxels.

    One file holds every channel (3D, or 4D channels last); several hold one channel each, one file per channel
    of the model, all on the first file's grid (shape and affine).
    """
    if len(files) > 1 and len(files) != in_channels:
        if len(files) > in_channels:
            return (f"{files[in_channels]} is one file too many: the case lists {len(files)} files and the model "
                    f"takes {in_channels} channel(s); remove the extra ones, or use a model that takes them")
        return (f"the case lists {len(files)} files ({', '.join(f.name for f in files)}) and the model takes "
                f"{in_channels} channels: add the missing channel files, in channel order")
    try:
        headers = [read_header(path, max_voxels) for path in files]
        if len(files) == 1:
            check_channels(files[0], headers[0], in_channels)
    except InputError as exc:
        return str(exc)
    return _grid_problem(files, headers, max_voxels) if len(files) > 1 else None


def _grid_problem(files: tuple[Path, ...], headers: list[VolumeHeader], max_voxels: int) -> str | None:
    """Why channel files cannot be stacked: one holds several channels, or its shape or affine is not the first's."""
    import nibabel as nib

    for path, header in zip(files, headers, strict=True):
        if len(header.shape) == 4 and header.shape[3] != 1:
            return (f"{path} holds {header.shape[3]} channels (shape {header.shape}): a case's channel file holds "
                    "one; split it into one file per channel, or pass it alone as the whole case")
    first, shape = files[0], headers[0].shape[:3]
    reference = np.asarray(nib.load(str(first)).affine)
    for path, header in zip(files[1:], headers[1:], strict=True):
        if header.shape[:3] != shape:
            return (f"{path} has shape {header.shape[:3]} and {first.name} {shape}: a case's channels share one "
                    f"grid; resample it onto {first.name}")
        difference = affine_difference(np.asarray(nib.load(str(path)).affine), reference)
        if difference:
            return (f"{path} differs from {first.name} in its affine ({difference}): a case's channels share one "
                    f"grid; resample it onto {first.name}")
    voxels = sum(header.voxels_stored for header in headers)
    if voxels > max_voxels:
        return (f"the case's {len(files)} channels hold {voxels:,} voxels, above the limit of {max_voxels:,} "
                "(SEGQ_MAX_VOXELS)")
    return None


def affine_difference(affine: np.ndarray, reference: np.ndarray, tolerance: float = AFFINE_TOLERANCE_MM) -> str:
    """What differs between two affines beyond ``tolerance`` mm: origin, voxel spacing, orientation; "" if none."""
    def shown(values: np.ndarray) -> str:
        return "(" + ", ".join(f"{float(v):g}" for v in np.round(values, 4)) + ")"

    found = []
    if np.abs(affine[:3, 3] - reference[:3, 3]).max() > tolerance:
        found.append(f"origin {shown(affine[:3, 3])} mm against {shown(reference[:3, 3])}")
    spacing, expected = np.linalg.norm(affine[:3, :3], axis=0), np.linalg.norm(reference[:3, :3], axis=0)
    if np.abs(spacing - expected).max() > tolerance:
        found.append(f"voxel spacing {shown(spacing)} mm against {shown(expected)}")
    elif np.abs(affine[:3, :3] - reference[:3, :3]).max() > tolerance:
        found.append(f"orientation of the voxel axes, by up to {np.abs(affine[:3, :3] - reference[:3, :3]).max():.3g}")
    return "; ".join(found)



def job_case(output_path: str, channel_files: list[str] | None) -> str | None:
    """The case a job of several channel files segments: its output's name without ``_seg.nii.gz`` (nnU-Net's
    ``BRATS_001`` for ``BRATS_001_0000`` to ``_0003``, a datalist's case name); None for a job of one file."""
    if not channel_files:
        return None
    name = Path(output_path).name
    return name.removesuffix(OUTPUT_SUFFIX) if name.endswith(OUTPUT_SUFFIX) else case_name(Path(channel_files[0]))


def case_label(name: str, files: int) -> str:
    """A case of several files as a table shows it: ``BRATS_001 (4 files)``."""
    return f"{name} ({files} files)"


def shown_input(input_path: str, output_path: str, channel_files: list[str] | None) -> str:
    """A job's input as a table shows it: a case of several files by its name and file count, else the file's
    name (a DICOM series' UID)."""
    case = job_case(output_path, channel_files)
    if case is None or not channel_files:
        return Path(input_path).name
    return case_label(case, len(channel_files))
