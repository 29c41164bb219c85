"""Label maps: their dtype, label names where tools find them, and per-label volumes.

A bundle's output is a label map (uint8, or uint16 past 255 labels) on the input's grid. Its label names go
two places: a JSON sidecar beside the NIfTI (``<name>_seg.json``: ``{"labels": {"1": "spleen", ...}}``, the
form 3D Slicer's and BIDS's label tables read most easily), and a NIfTI header extension of code 6
(``comment``, which every NIfTI reader keeps and shows) holding the same JSON, so the names travel with the
file when the sidecar does not. A model.toml's binary mask keeps today's output exactly: no sidecar, no
extension.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

EXTENSION_CODE = 6  # NIFTI_ECODE_COMMENT
SCHEMA = "segq.labels/1"


def document(names: dict[int, str]) -> dict[str, Any]:
    return {"schema": SCHEMA, "labels": {str(value): name for value, name in sorted(names.items())}}


def nifti_extension(names: dict[int, str]) -> Any:
    import nibabel as nib

    return nib.nifti1.Nifti1Extension(EXTENSION_CODE, json.dumps(document(names)).encode())


def sidecar_path(output: Path) -> Path:
    name = output.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return output.with_name(name[: -len(suffix)] + ".json")
    return output.with_name(name + ".json")


def write_sidecar(output: Path, names: dict[int, str]) -> Path:
    from segq import storage

    path = sidecar_path(output)
    with storage.atomic_path(path) as tmp:
        tmp.write_text(json.dumps(document(names), indent=1) + "\n")
    return path


def read_names(path: Path) -> dict[int, str] | None:
    """The label names a label map carries in its header extension, else in its sidecar; None when neither."""
    import nibabel as nib

    image = nib.load(str(path))
    for extension in image.header.extensions:
        if extension.get_code() == EXTENSION_CODE:
            try:
                data = json.loads(extension.get_content())
            except (ValueError, UnicodeDecodeError):
                continue
            if isinstance(data, dict) and data.get("schema") == SCHEMA:
                return {int(k): str(v) for k, v in data["labels"].items()}
    sidecar = sidecar_path(path)
    if sidecar.is_file():
        return {int(k): str(v) for k, v in json.loads(sidecar.read_text())["labels"].items()}
    return None


def label_volumes(mask: np.ndarray, names: dict[int, str], voxel_ml: float) -> list[dict[str, Any]]:
    """Voxels and mL of every label but the background, named; a value the names lack is listed as ``label N``."""
    counts = _counts(mask.ravel(order="K"), max(names, default=0) + 1)  # "K": a NIfTI-ordered mask is not copied
    values = sorted(set(names) | {int(v) for v in np.flatnonzero(counts)})
    return [{"value": v, "name": names.get(v, f"label {v}"), "voxels": int(counts[v]) if v < counts.size else 0,
             "ml": round(float(counts[v] if v < counts.size else 0) * voxel_ml, 4)} for v in values if v > 0]


def _counts(flat: np.ndarray, minlength: int) -> np.ndarray:
    """How many voxels hold each value of a flat label map. A uint8 map (every mask segq writes) is counted by torch,
    which reads its bytes as they are: numpy's bincount widens them to 8 bytes first (a CT's mask: 1.9 s of merge
    on two cores, against 0.16 s)."""
    if flat.dtype != np.uint8:
        return np.bincount(flat, minlength=minlength)
    if flat.size and int(flat.max()) <= 1:  # a binary mask (a model.toml's): one SIMD count, a tenth of a bincount
        labelled = int(np.count_nonzero(flat))
        return np.bincount([0, 1], weights=[flat.size - labelled, labelled], minlength=minlength).astype(np.int64)
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")  # only read
        return torch.bincount(torch.from_numpy(flat), minlength=minlength).numpy()
