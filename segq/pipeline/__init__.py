"""A model is a pipeline: what happens to a case from its files to a label map on the scan's own grid.

Every stage (submit, the split, prepare, parts, merge, results, report, DICOM SEG) reads one object,
:class:`segq.modelspec.ModelSpec`, whatever the format it came from. One file per format:

- ``segq/pipeline/toml.py``: segq's own model.toml (one MONAI network, z-score or nothing, one target class
  thresholded at 0.5 into a binary mask);
- ``segq/pipeline/bundle.py`` with ``bundle_stages.py``: a MONAI bundle (its own preprocessing, inferer
  settings, postprocessing and label names), checked by ``policy.py``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from segq.errors import InputError
from segq.modelspec import ModelSpec, bundle_network_config, model_checksum, spec_from_dict
from segq.pipeline.toml import load_model_spec

__all__ = ["ModelSpec", "bundle_checksum", "load_pipeline"]


def load_pipeline(path: str | Path, *, trust: bool = False, unpack_into: Path | None = None,
                  cache: Path | None = None) -> ModelSpec:
    """The pipeline named by ``--model``: a model.toml, a MONAI bundle folder, or a bundle's .zip (unpacked
    under ``unpack_into``, the shared storage, so every worker reads the same files).

    A bundle read once is kept under ``cache`` (a folder), by its checksum and folder: read again with the same
    config, metadata, weights and trust, it costs no MONAI or torch import (14 s on a GPU host).
    """
    path = Path(path).expanduser().resolve()
    if not path.exists():
        raise InputError(f"model {path} does not exist: pass --model PATH to a model.toml or a MONAI bundle")
    from segq.pipeline import bundle

    if bundle.is_bundle(path):
        from segq.pipeline.bundle_stages import load_bundle

        root = path
        if path.suffix == ".zip":
            if unpack_into is None:
                from segq.settings import get_settings

                unpack_into = get_settings().storage_root / "bundles"
            root = bundle.unpack(path, unpack_into)
        entry = _cache_entry(cache, root, trust) if cache is not None else None
        if entry is not None and entry.is_file():
            return spec_from_dict(json.loads(entry.read_text()))
        spec = load_bundle(root, trust=trust)
        if entry is not None:
            from segq import storage

            entry.parent.mkdir(parents=True, exist_ok=True)
            with storage.atomic_path(entry) as tmp:
                tmp.write_text(json.dumps(spec.to_dict()))
        return spec
    if path.is_dir():
        raise InputError(f"model {path} is a folder without configs/: a MONAI bundle holds configs/inference.json")
    return load_model_spec(path)


def _cache_entry(cache: Path, root: Path, trusted: bool) -> Path:
    key = hashlib.sha256(f"{bundle_checksum(root, trusted)}:{root}".encode()).hexdigest()
    return cache / f"{key}.json"


def bundle_checksum(root: Path, trusted: bool) -> str:
    """A bundle's model checksum (ModelSpec.checksum) from its files alone, without parsing them."""
    from segq.pipeline import bundle

    return model_checksum(bundle_network_config(root, trusted), bundle.find_files(root).weights)
