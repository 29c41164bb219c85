"""Find the NIfTI inputs named on the command line and check them before anything is queued."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from segq.errors import InputError
from segq.settings import get_settings
from segq.storage import is_nifti, output_path, require_allowed


@dataclass(frozen=True)
class Input:
    path: Path
    output: Path


def _scan_dir(root: Path, out_dir: Path) -> list[tuple[Path, Path]]:
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
            if not name.startswith(".") and is_nifti(path):
                found.append((path, path.relative_to(root)))
    return found


def collect_inputs(paths: list[Path], out_dir: Path) -> list[Input]:
    """Every NIfTI volume under ``paths`` (files, directories, or both) with its output path.

    A missing or unreadable path is refused here, naming it, so nothing is queued for a typo.
    Two inputs mapping to one output are refused too.
    """
    if not paths:
        raise InputError("no inputs given: pass one or more NIfTI files or directories")
    roots = get_settings().allowed_root_paths
    out_dir = require_allowed(out_dir, roots, "output directory")
    pairs: list[tuple[Path, Path]] = []
    for given in paths:
        path = given.expanduser()
        if not path.exists():
            raise InputError(f"input {given} does not exist")
        if path.is_dir():
            if path.resolve() == out_dir:
                raise InputError(f"--out {out_dir} is the input directory {given}: write the masks elsewhere "
                                 "(a subdirectory is fine)")
            found = _scan_dir(path, out_dir)
            if not found:
                raise InputError(f"input directory {given} holds no .nii or .nii.gz files")
            pairs.extend(found)
        elif is_nifti(path):
            pairs.append((path, Path(path.name)))
        else:
            raise InputError(f"input {given} is not a .nii or .nii.gz file")
    inputs: dict[Path, Input] = {}
    by_output: dict[Path, Path] = {}
    for path, relative in pairs:
        resolved = require_allowed(path, roots, "input")
        if not os.access(resolved, os.R_OK) or not resolved.is_file():
            raise InputError(f"input {path} is not a readable file")
        target = output_path(out_dir, relative)
        if target in by_output and by_output[target] != resolved:
            raise InputError(f"inputs {by_output[target]} and {resolved} would both write {target}: rename one")
        by_output[target] = resolved
        inputs[resolved] = Input(resolved, target)
    return list(inputs.values())
