"""Find the NIfTI files and DICOM series named on the command line and check them before anything is queued.

A DICOM file is recognised by its content, with or without a .dcm suffix; files are grouped into series
by SeriesInstanceUID, each series one volume. A DICOM file or series that cannot be segmented is refused
alone, with one line saying why; the rest of the dataset goes ahead.

A case may come as several files, one per channel: named the nnU-Net way (``<case>_0000.nii.gz`` to
``_000N``, grouped per directory when the model takes more than one channel), or listed in a datalist (JSON
as MONAI writes it, or CSV), found and parsed in producer/cases.py. A case whose channel files are missing, extra
or doubled is refused alone too.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from producer.cases import Case, Datalist, group_channels, read_datalist
from segq.dicom import SEG_SUFFIX, Refused, Series, find_series, is_dicom, seg_output
from segq.errors import InputError
from segq.labelmaps import sidecar_path
from segq.settings import get_settings
from segq.storage import (
    is_nifti,
    length_problem,
    name_problem,
    output_path,
    printable,
    probability_path,
    require_allowed,
)

logger = logging.getLogger("segq.scan")

OUTPUT_FORMATS = ("auto", "nifti", "dicom-seg", "both")


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


def collect_inputs(paths: list[Path], out_dir: Path, output_format: str = "auto", *,
                   in_channels: int = 1) -> list[Input]:
    """Every volume under ``paths`` with its output path; refused DICOM files and series are logged and left out."""
    collected = collect(paths, out_dir, output_format, in_channels=in_channels)
    for refusal in collected.refused:
        logger.warning("refused %s", printable(refusal.line()))
    return collected.inputs


def _series_format(requested: str) -> str:
    return "both" if requested == "auto" else requested


def output_family(output: Path) -> list[Path]:
    """Every file a job may write for the mask ``output`` (worker.jobs.outputs_of): the mask, its label sidecar,
    its probabilities and its DICOM SEG."""
    return [output, sidecar_path(output), probability_path(output), seg_output(output)]


def _target(out_dir: Path, relative: Path) -> Path | str:
    """The output path of the input at ``relative``, or why its name cannot be written under ``out_dir``: a part
    that could escape (a separator, ``..``), a control character, or a name past the filesystem's length limit."""
    problem = next((p for part in relative.parts if (p := name_problem(part)) is not None), None)
    if problem is not None:
        return problem
    target = output_path(out_dir, relative)
    return length_problem(output_family(target), out_dir) or target


def _series_input(series: Series, root: Path, out_dir: Path, fmt: str) -> Input | str:
    """A series' input path (its directory and UID: what results show) and its stable output path, or why its
    folder's name cannot be written under ``out_dir``."""
    directory = series.directory
    relative = directory.relative_to(root) if directory.is_relative_to(root) else Path()
    target = _target(out_dir, relative / series.uid)
    if isinstance(target, str):
        return target
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
    bad_names: list[str] = []  # every input whose output cannot be named: listed together, nothing queued
    nifti_format = "nifti" if output_format in ("auto", "nifti") else None
    for path, relative in grouped.singles:
        if nifti_format is None:
            _readable(path, roots)
            refused.append(Refused(str(path), f"a NIfTI file has no DICOM series to reference: "
                                              f"--output-format {output_format} needs DICOM input"))
            continue
        target = _target(out_dir, relative)
        if isinstance(target, str):
            bad_names.append(f"{printable(str(path))}: {target}")
            continue
        resolved = _readable(path, roots)
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
        volume = _series_input(one, root_of[one.files[0]], out_dir, _series_format(output_format))
        if isinstance(volume, str):
            bad_names.append(f"series {one.uid} in {printable(str(one.directory))}: {volume}")
            continue
        _claim(by_output, volume.output, volume.path)
        inputs[volume.path] = volume
    _refuse_names(bad_names, out_dir)
    return Collected(list(inputs.values()), refused)


def _refuse_names(bad: list[str], out_dir: Path) -> None:
    """Every input whose output cannot be named, in one error, one line each: a folder of thousands of scans is
    fixed in one pass, not one rename and resubmission per name."""
    if bad:
        raise InputError(f"{len(bad)} input name(s) cannot be written under {printable(str(out_dir))}, so nothing "
                         "was queued: rename them (names may hold spaces, accents and any script; path separators, "
                         "'..', control characters and names past the filesystem's length limit are refused):\n"
                         + "\n".join(f"  {line}" for line in bad))


def _readable(path: Path, roots: list[Path]) -> Path:
    resolved = require_allowed(path, roots, "input")
    if not os.access(resolved, os.R_OK) or not resolved.is_file():
        raise InputError(f"input {path} is not a readable file")
    return resolved


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
    target = _target(out_dir, case.relative)
    if isinstance(target, str):  # first: an nnU-Net case named after its files, with ESC in them, is refused alone
        return case.refused(f"its output name {printable(str(case.relative))} {target}")
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
