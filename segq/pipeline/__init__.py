"""A model is a pipeline: what happens to a case from its files to a label map on the scan's own grid.

Every stage (submit, the split, prepare, parts, merge, results, report, DICOM SEG) reads one object,
:class:`segq.modelspec.ModelSpec`, whatever the format it came from. One file per format:

- ``segq/modelspec.py``: segq's own model.toml (one MONAI network, z-score or nothing, one target class
  thresholded at 0.5 into a binary mask);
- ``segq/pipeline/bundle.py`` with ``bundle_stages.py``: a MONAI bundle (its own preprocessing, inferer
  settings, postprocessing and label names), checked by ``policy.py``.
"""

from __future__ import annotations

from pathlib import Path

from segq.errors import InputError
from segq.modelspec import ModelSpec, load_model_spec

__all__ = ["ModelSpec", "load_pipeline"]


def load_pipeline(path: str | Path, *, trust: bool = False, unpack_into: Path | None = None) -> ModelSpec:
    """The pipeline named by ``--model``: a model.toml, a MONAI bundle folder, or a bundle's .zip (unpacked
    under ``unpack_into``, the shared storage, so every worker reads the same files)."""
    path = Path(path).expanduser().resolve()
    if not path.exists():
        raise InputError(f"model {path} does not exist: pass --model PATH to a model.toml or a MONAI bundle")
    from segq.pipeline import bundle

    if bundle.is_bundle(path):
        from segq.pipeline.bundle_stages import load_bundle

        return load_bundle(path, trust=trust, unpack_into=unpack_into)
    if path.is_dir():
        raise InputError(f"model {path} is a folder without configs/: a MONAI bundle holds configs/inference.json")
    return load_model_spec(path)
