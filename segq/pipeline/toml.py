"""segq's own model format, model.toml: one MONAI network, its checkpoint, z-score or nothing, one target class
thresholded at 0.5, and the sliding-window settings. Read into the pipeline every stage reads
(segq.modelspec.ModelSpec); segq/pipeline/bundle.py reads the other format, MONAI bundles."""

from __future__ import annotations

import tomllib
from pathlib import Path

from segq.errors import InputError
from segq.modelspec import FIELD_TYPES, ModelSpec, check_types


def load_model_spec(path: str | Path) -> ModelSpec:
    """Read and validate a model.toml; the checkpoint path is taken relative to the file."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise InputError(f"model file {path} does not exist: pass --model PATH to a model.toml")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"model file {path} is not valid TOML: {exc}") from exc
    data = data.get("model", data)
    missing = [key for key in ("arch", "in_channels", "out_channels", "roi_size", "target_class", "checkpoint")
               if key not in data]
    if missing:
        raise InputError(f"model file {path} lacks {', '.join(missing)}")
    known = set(FIELD_TYPES) | {"segment_label", "segment_category", "segment_type"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise InputError(
            f"model file {path}: unknown keys {', '.join(unknown)}; known keys are {', '.join(sorted(known))}"
        )
    data = check_types(data, f"model file {path}")
    checkpoint = (path.parent / str(data["checkpoint"])).resolve()
    if not checkpoint.is_file():
        raise InputError(f"model file {path}: checkpoint {checkpoint} does not exist")
    try:
        spec = ModelSpec(**{**data, "checkpoint": checkpoint, "path": path})
    except TypeError as exc:
        raise InputError(f"model file {path}: {exc}") from exc
    spec.validate()
    return spec



def write_model_toml(path: Path, spec: ModelSpec) -> None:
    """Write ``spec`` as a model.toml whose checkpoint is relative to it."""
    checkpoint = Path(spec.checkpoint)
    try:
        rel = checkpoint.resolve().relative_to(path.parent.resolve())
    except ValueError:
        rel = checkpoint
    lines = [
        f'arch = "{spec.arch}"', f"in_channels = {spec.in_channels}", f"out_channels = {spec.out_channels}",
        f"feature_size = {spec.feature_size}", f"roi_size = {spec.roi_size}", f"target_class = {spec.target_class}",
        f'checkpoint = "{rel.as_posix()}"', f'preprocess = "{spec.preprocess}"', f"overlap = {spec.overlap}",
        f"sw_batch_size = {spec.sw_batch_size}", f'mode = "{spec.mode}"',
    ]
    path.write_text("\n".join(lines) + "\n")
