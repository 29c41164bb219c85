"""Find the NIfTI files and DICOM series named on the command line and check them before anything is queued.

A DICOM file is recognised by its content, with or without a .dcm suffix; files are grouped into series
by SeriesInstanceUID, each series one volume. A DICOM file or series that cannot be segmented is refused
alone, with one line saying why; the rest of the dataset goes ahead.

A case may come as several files, one per channel: named the nnU-Net way (``<case>_0000.nii.gz`` to
``_000N``, grouped per directory when the model takes more than one channel), or listed in a datalist (JSON
as MONAI writes it, or CSV). A case whose channel files are missing, extra or doubled is refused alone too.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segq.dicom import SEG_SUFFIX, Refused, Series, find_series, is_dicom
from segq.errors import InputError
from segq.settings import get_settings
from segq.storage import is_nifti, output_path, require_allowed, strip_nifti_suffix

logger = logging.getLogger("segq.scan")

OUTPUT_FORMATS = ("auto", "nifti", "dicom-seg", "both")
NNUNET_NAME = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})\.nii(\.gz)?$")
DATALIST_SECTIONS = ("testing", "test", "validation", "training")  # the first present is read
NOT_CHANNELS = ("case", "name", "label")  # a datalist's case name and ground truth: never a channel
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
class Input:
    """One volume: a NIfTI file, a DICOM series (then ``path`` is the series' directory joined with its UID), or
    a case (then ``path`` is its first file; ``channels`` holds every file of a case of several, in order)."""

    path: Path
    output: Path
    series: Series | None = None
    output_format: str = "nifti"
    channels: tuple[Path, ...] = ()
    case: Case | None = None  # set for a case: checked at submit, refused alone


@dataclass(frozen=True)
class Collected:
    inputs: list[Input]
    refused: list[Refused] = field(default_factory=list)


def _dicom_candidate(path: Path) -> bool:
    return path.suffix.lower() == ".dcm" or is_dicom(path)


def _scan_dir(root: Path, out_dir: Path, dicom: list[tuple[Path, Path]] | None = None) -> list[tuple[Path, Path]]:
    """NIfTI files under ``root`` (with their relative paths), never under ``out_dir``; DICOM candidates go to
    ``dicom`` with their root."""
    found = []
    # The output directory is never an input: else every resubmission would take the last masks as new volumes.
    seen: set[Path] = {out_dir}
    # Symlinked directories are followed (each real directory once, so a link loop ends), and what they hold
    # is checked against SEGQ_ALLOWED_ROOTS like any input, rather than silently skipped.
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = Path(dirpath).resolve()
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if name.startswith("."):
                continue
            if is_nifti(path):
                found.append((path, path.relative_to(root)))
            elif dicom is not None and _dicom_candidate(path):
                dicom.append((path, root))
    return found


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


def collect_inputs(paths: list[Path], out_dir: Path, output_format: str = "auto", *,
                   in_channels: int = 1) -> list[Input]:
    """Every volume under ``paths`` with its output path; refused DICOM files and series are logged and left out."""
    collected = collect(paths, out_dir, output_format, in_channels=in_channels)
    for refusal in collected.refused:
        logger.warning("refused %s", refusal.line())
    return collected.inputs


def _series_format(requested: str) -> str:
    return "both" if requested == "auto" else requested


def _series_input(series: Series, root: Path, out_dir: Path, fmt: str) -> Input:
    """A series' input path (its directory and UID: what results show) and its stable output path."""
    directory = series.directory
    relative = directory.relative_to(root) if directory.is_relative_to(root) else Path()
    target = output_path(out_dir, relative / series.uid)
    if fmt == "dicom-seg":
        target = target.with_name(series.uid + SEG_SUFFIX)
    return Input(directory / series.uid, target, series, fmt)


def collect(paths: list[Path], out_dir: Path, output_format: str = "auto", *, in_channels: int = 1,
            datalist: Path | None = None) -> Collected:
    """Every volume under ``paths`` (files, directories, or both) and in ``datalist``, with its output path, and
    what was refused.

    A missing or unreadable path is refused here, naming it, so nothing is queued for a typo; a case's missing file
    refuses that case alone. Two inputs mapping to one output are refused too. For a model of several channels
    (``in_channels``), nnU-Net-named files become cases (group_channels).
    """
    if output_format not in OUTPUT_FORMATS:
        raise InputError(f"output format {output_format!r} is not one of {', '.join(OUTPUT_FORMATS)}")
    if not paths and datalist is None:
        raise InputError("no inputs given: pass one or more NIfTI files, DICOM series or directories, "
                         "or --datalist FILE")
    roots = get_settings().allowed_root_paths
    out_dir = require_allowed(out_dir, roots, "output directory")
    pairs, dicom = _given(paths, out_dir)
    grouped = group_channels(pairs, in_channels)
    listed = _listed(datalist, roots)
    inputs: dict[Path, Input] = {}
    by_output: dict[Path, Path] = {}
    refused: list[Refused] = [*grouped.refused, *listed.refused]
    nifti_format = "nifti" if output_format in ("auto", "nifti") else None
    for path, relative in grouped.singles:
        resolved = require_allowed(path, roots, "input")
        if not os.access(resolved, os.R_OK) or not resolved.is_file():
            raise InputError(f"input {path} is not a readable file")
        if nifti_format is None:
            refused.append(Refused(str(path), f"a NIfTI file has no DICOM series to reference: "
                                              f"--output-format {output_format} needs DICOM input"))
            continue
        target = output_path(out_dir, relative)
        _claim(by_output, target, resolved)
        inputs[resolved] = Input(resolved, target)
    owners = {item.path: item for item in inputs.values()}
    for case in [*grouped.cases, *listed.cases]:
        if nifti_format is None:
            refused.append(case.refused(f"a NIfTI case has no DICOM series to reference: --output-format "
                                        f"{output_format} needs DICOM input"))
            continue
        item = _case_input(case, out_dir, roots)
        problem = item if isinstance(item, Refused) else _owned(item, owners)
        if problem is not None:
            refused.append(problem)
            continue
        assert isinstance(item, Input)
        _claim(by_output, item.output, item.path)
        inputs[item.path] = item
    root_of = {require_allowed(path, roots, "input"): root.expanduser().resolve() for path, root in dicom}
    series, bad = find_series(sorted(root_of))
    refused.extend(bad)
    for one in series:
        item = _series_input(one, root_of[one.files[0]], out_dir, _series_format(output_format))
        _claim(by_output, item.output, item.path)
        inputs[item.path] = item
    return Collected(list(inputs.values()), refused)


def _given(paths: list[Path], out_dir: Path) -> tuple[list[tuple[Path, Path]], list[tuple[Path, Path]]]:
    """The NIfTI files named or found under ``paths`` (with their paths relative to where they were found), and
    the DICOM candidates (with their roots)."""
    pairs: list[tuple[Path, Path]] = []
    dicom: list[tuple[Path, Path]] = []
    for given in paths:
        path = given.expanduser()
        if not path.exists():
            raise InputError(f"input {given} does not exist")
        if path.is_dir():
            if path.resolve() == out_dir:
                raise InputError(f"--out {out_dir} is the input directory {given}: write the masks elsewhere "
                                 "(a subdirectory is fine)")
            found = _scan_dir(path, out_dir, dicom)
            if not found and not any(root == path for _, root in dicom):
                raise InputError(f"input directory {given} holds no .nii or .nii.gz files and no DICOM files")
            pairs.extend(found)
        elif is_nifti(path):
            pairs.append((path, Path(path.name)))
        elif _dicom_candidate(path):
            dicom.append((path, path.parent))
        else:
            raise InputError(f"input {given} is neither a .nii or .nii.gz file nor a DICOM file")
    return pairs, dicom


def _listed(datalist: Path | None, roots: list[Path]) -> Datalist:
    if datalist is None:
        return Datalist([], [])
    path = require_allowed(datalist.expanduser(), roots, "datalist")
    found = read_datalist(path)
    if found.section is not None:
        logger.info("datalist %s: read its %r list (%d case(s))", datalist, found.section,
                    len(found.cases) + len(found.refused))
    return found


def _case_input(case: Case, out_dir: Path, roots: list[Path]) -> Input | Refused:
    """A case's files resolved and checked to exist (its headers are checked at submit), with its output path."""
    resolved: list[Path] = []
    for path in case.files:
        if not is_nifti(path):
            return case.refused(f"{path} is not a .nii or .nii.gz file")
        real = require_allowed(path, roots, "input")
        if not real.exists():
            return case.refused(f"{path} does not exist")
        if not real.is_file() or not os.access(real, os.R_OK):
            return case.refused(f"{path} is not a readable file: check its permissions")
        resolved.append(real)
    try:
        target = output_path(out_dir, case.relative)
    except InputError as exc:
        return case.refused(f"its output name: {exc}")
    return Input(resolved[0], target, channels=tuple(resolved) if len(resolved) > 1 else (), case=case)


def _owned(item: Input, owners: dict[Path, Input]) -> Refused | None:
    """A file feeds one volume: the same case twice (a folder and its datalist) is one, a file in two is refused."""
    assert item.case is not None
    for path in item.channels or (item.path,):
        other = owners.get(path)
        if other is not None and (other.output, other.channels) != (item.output, item.channels):
            return item.case.refused(f"{path} is already an input of {other.output}: a file belongs to one case")
    owners.update(dict.fromkeys(item.channels or (item.path,), item))
    return None


def _claim(by_output: dict[Path, Path], target: Path, source: Path) -> None:
    if target in by_output and by_output[target] != source:
        raise InputError(f"inputs {by_output[target]} and {source} would both write {target}: rename one")
    by_output[target] = source
