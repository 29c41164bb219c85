"""A MONAI MetaTensor's metadata and its trace of applied transforms, as JSON.

Prepare runs a bundle's preprocessing on the coordinator; merge, in another process and often on another
machine, inverts it with the bundle's own ``Invertd``. What ``Invertd`` needs is the preprocessed image's
``meta`` and ``applied_operations``, not its voxels: they cross the workspace as JSON (never pickle), with
tensors and arrays kept at their dtype so affines round-trip exactly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

_TAG = "__segq__"


def encode(value: Any) -> Any:
    """``value`` (dicts, lists, tuples, tensors, arrays, numpy scalars, dtypes) as plain JSON types."""
    import torch

    if isinstance(value, dict):
        return {str(k): encode(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return {_TAG: "tuple", "items": [encode(v) for v in value]}
    if isinstance(value, list):
        return [encode(v) for v in value]
    if isinstance(value, torch.Tensor):
        array = value.detach().cpu().numpy()
        return {_TAG: "tensor", "dtype": str(array.dtype), "shape": list(array.shape), "data": array.ravel().tolist()}
    if isinstance(value, np.ndarray):
        return {_TAG: "ndarray", "dtype": str(value.dtype), "shape": list(value.shape), "data": value.ravel().tolist()}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, torch.dtype):
        return {_TAG: "torch_dtype", "name": str(value).removeprefix("torch.")}
    if isinstance(value, np.dtype) or (isinstance(value, type) and issubclass(value, np.generic)):
        return {_TAG: "numpy_dtype", "name": np.dtype(value).name}
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot record a {type(value).__name__} in a transform trace")


def decode(value: Any) -> Any:
    """The inverse of :func:`encode`."""
    import torch

    if isinstance(value, list):
        return [decode(v) for v in value]
    if not isinstance(value, dict):
        return value
    tag = value.get(_TAG)
    if tag is None:
        return {k: decode(v) for k, v in value.items()}
    if tag == "tuple":
        return tuple(decode(v) for v in value["items"])
    if tag in ("tensor", "ndarray"):
        array = np.asarray(value["data"], dtype=np.dtype(value["dtype"])).reshape(value["shape"])
        return torch.from_numpy(array) if tag == "tensor" else array
    if tag == "torch_dtype":
        return getattr(torch, value["name"])
    if tag == "numpy_dtype":
        return np.dtype(value["name"]).type
    raise ValueError(f"unknown tag {tag!r} in a transform trace")


def save(path: Path, meta: dict[str, Any], operations: list[Any]) -> None:
    from segq import storage

    with storage.atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"meta": encode(dict(meta)), "applied_operations": encode(list(operations))}))


def load(path: Path) -> tuple[dict[str, Any], list[Any]]:
    document = json.loads(path.read_text())
    return decode(document["meta"]), decode(document["applied_operations"])
