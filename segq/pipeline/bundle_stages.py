"""A MONAI bundle's stages, as segq runs them: read at submit, network on the worker, preprocessing at
prepare, postprocessing (with the inversion back to the scan's grid) at merge.

Where each runs, and why: preprocessing (orientation, spacing, intensity) runs on the coordinator's CPU
with the bundle's own MONAI transforms. They are the bundle's definition of its input, their trace is
what ``Invertd`` needs, and a part then reads the model-grid array it would otherwise have to rebuild.
bench/volume_costs.py times each step. Postprocessing runs at merge on the summed logits, as the bundle's
evaluator runs it on ``sliding_window_inference``'s output: activation, inversion and argmax or
threshold in the bundle's own order.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import numpy as np

from segq.errors import InputError
from segq.modelspec import ModelSpec, bundle_config_sha256
from segq.pipeline import bundle, trace

logger = logging.getLogger("segq.bundle")

IMAGE_KEY = "image"
PRED_KEY = "pred"


def load_bundle(root: Path, *, trust: bool = False) -> ModelSpec:
    """The pipeline of a bundle folder (segq.pipeline.load_pipeline unpacks a .zip first), checked against
    segq's policy unless ``trust``."""
    files, config, parser = _read(root, trust)
    arch, in_channels, out_channels = bundle.network_channels(parser, root)
    window = bundle.inferer_settings(parser, config, root)
    spec = ModelSpec(
        arch=arch, in_channels=in_channels, out_channels=out_channels, roi_size=max(window["roi"]),
        target_class=0, checkpoint=files.weights, preprocess="bundle", overlap=window["overlap"],
        sw_batch_size=window["sw_batch_size"], mode=window["mode"], path=root, format="bundle",
        bundle=str(root), roi_shape=tuple(window["roi"]), sigma_scale=window["sigma_scale"],
        padding_mode=window["padding_mode"], labels=bundle.labels_from_metadata(files.metadata, out_channels),
        trusted=trust,
    )
    spec.validate()
    return spec


def _read(root: Path, trusted: bool) -> tuple[bundle.BundleFiles, dict[str, Any], Any]:
    """A bundle's files, its config as segq runs it (SaveImaged dropped), and a parser over what the policy lets
    run of it."""
    files = bundle.find_files(root)
    config = bundle.placed_config(bundle.read_config(files.config), root)
    return files, config, bundle.parsed(config, files, trusted)


def _parser(root: str, trusted: bool) -> Any:
    return _read(Path(root), trusted)[2]


@functools.lru_cache(maxsize=4)
def _sections(root: str, trusted: bool, config_sha256: str) -> tuple[str, Any, Any]:
    """A bundle's image key and its preprocessing and postprocessing, instantiated once a process (parsing and
    instantiating them took about 0.4 s a volume); keyed by the config's checksum, so an edit is a new entry."""
    parser = _parser(root, trusted)
    post = parser.get_parsed_content("postprocessing") if parser.get("postprocessing") is not None else None
    return _image_key(parser), parser.get_parsed_content("preprocessing"), post


def sections(spec: ModelSpec) -> tuple[str, Any, Any]:
    return _sections(spec.bundle, spec.trusted, bundle_config_sha256(Path(spec.bundle)))


def _image_key(parser: Any) -> str:
    """The data key the bundle's preprocessing reads the scan from: its first transform's keys."""
    first = (parser.get("preprocessing#transforms") or [{}])[0]
    keys = first.get("keys", IMAGE_KEY) if isinstance(first, dict) else IMAGE_KEY
    if isinstance(keys, str) and keys.startswith("@"):
        keys = parser.get_parsed_content(keys[1:])
    if isinstance(keys, list | tuple):
        keys = keys[0]
    return str(keys)


def network_def(spec: ModelSpec) -> Any:
    """The bundle's network as its ``network_def`` builds it, without weights (worker.engines.model loads them)."""
    parser = _parser(spec.bundle, spec.trusted)
    try:
        return parser.get_parsed_content("network_def")
    except Exception as exc:  # MONAI's own checks of the network's arguments
        raise InputError(f"bundle {spec.bundle}: network_def cannot be built ({' '.join(str(exc).split())[:300]})"
                         "; fix the bundle's network_def") from None


def preprocess_case(spec: ModelSpec, files: list[Path]) -> tuple[np.ndarray, dict[str, Any], list[Any]]:
    """The case on the model's grid, (C, X, Y, Z) float32, with the meta and trace that invert it."""
    import torch

    key, transform, _post = sections(spec)
    source: Any = [str(p) for p in files] if len(files) > 1 else str(files[0])
    try:
        data = transform({key: source})
    except Exception as exc:  # MONAI wraps a transform's failure in a RuntimeError naming the transform
        reason = " ".join(str(exc).split())[-300:]
        raise InputError(f"{files[0]}: the bundle's preprocessing failed ({reason})") from exc
    image = data[key]
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.ndim != 4 or array.shape[0] != spec.in_channels:
        raise InputError(f"{files[0]}: the bundle's preprocessing gave an array of shape {list(array.shape)}; the "
                         f"network takes {spec.in_channels} channel(s) of a 3D volume")
    meta = dict(getattr(image, "meta", {}) or {})
    operations = list(getattr(image, "applied_operations", []) or [])
    return np.ascontiguousarray(array, dtype=np.float32), meta, operations


def save_context(ws: Path, meta: dict[str, Any], operations: list[Any]) -> None:
    trace.save(ws / "trace.json", meta, operations)


def postprocess(spec: ModelSpec, logits: Any, ws: Path, spatial_shape: tuple[int, ...]) -> Any:
    """The bundle's postprocessing over the merged logits (K, X, Y, Z): the label map on the scan's grid, as a
    uint8 (uint16 past 255) tensor where the logits are: an array's on the CPU, a device tensor's on its device
    (a GPU worker then checks and casts it there, and only the label map leaves the device)."""
    import torch
    from monai.data import MetaTensor

    channels = int(logits.shape[0])
    data, post = postprocess_inputs(spec, logits, ws)
    if post is not None:
        try:
            data = post(data)
        except Exception as exc:
            raise InputError(f"the bundle's postprocessing failed ({' '.join(str(exc).split())[-300:]})") from exc
    labels = torch.as_tensor(data[PRED_KEY]).detach()
    labels = labels.as_tensor() if isinstance(labels, MetaTensor) else labels
    if labels.ndim == 4 and labels.shape[0] == 1:
        labels = labels[0]
    if labels.ndim == 4 and labels.shape[0] == channels and channels > 1:
        raise InputError(f"the bundle's postprocessing leaves {labels.shape[0]} channels, not one label map: add "
                         "AsDiscreted(argmax=True) or a mapping of channels to labels to its postprocessing")
    if tuple(labels.shape) != tuple(spatial_shape):
        raise InputError(f"the bundle's postprocessing gives a label map of shape {list(labels.shape)}, not the "
                         f"scan's {list(spatial_shape)}: its postprocessing needs an Invertd of its preprocessing")
    return label_tensor(labels)


def postprocess_inputs(spec: ModelSpec, logits: Any, ws: Path) -> tuple[dict[str, Any], Any]:
    """What the bundle's postprocessing runs on, as its evaluator hands it over: the prediction, and the image
    carrying the preprocessing's meta and trace (read back from ``ws``) for Invertd; with the postprocessing."""
    import torch
    from monai.data import MetaTensor
    from monai.utils import TraceKeys

    meta, operations = trace.load(ws / "trace.json")
    for operation in _walk_operations(operations):
        operation[TraceKeys.ID] = TraceKeys.NONE  # the transforms are rebuilt here, not the objects that ran
    key, _pre, post = sections(spec)
    image = MetaTensor(torch.zeros(1), meta=dict(meta), applied_operations=operations)
    pred = MetaTensor(torch.as_tensor(logits), meta=dict(meta))
    return {key: image, PRED_KEY: pred}, post


def label_tensor(labels: Any) -> Any:
    """``labels`` as a uint8 (uint16 past 255) tensor on its device; InputError for what no label map holds."""
    import torch

    if labels.is_floating_point():
        if not bool(torch.isfinite(labels).all()):
            raise InputError("the bundle's postprocessing left NaN or infinite labels")
        rounded = torch.round(labels)
        if bool((rounded != labels).any()):
            # An Invertd with bilinear interpolation after the argmax (prostate_mri_anatomy's order) resamples
            # the label values themselves: the bundle's own SaveImaged writes those fractions as float32. A label
            # map holds whole labels, so each voxel takes the nearest one.
            logger.info("the bundle's postprocessing left fractional label values (an Invertd with "
                        "nearest_interp false after the argmax): rounded to the nearest label")
        labels = rounded
    low, high = (float(labels.min()), float(labels.max())) if labels.numel() else (0.0, 0.0)
    if low < 0 or high > 65535:
        raise InputError(f"label values {low:g}..{high:g} do not fit a label map (0..65535)")
    if high <= 255:
        return labels.to(torch.uint8)
    return labels.to(torch.int32).to(torch.uint16)  # through int32: float to uint16 is not every torch's cast


def _walk_operations(operations: list[Any]) -> list[dict[str, Any]]:
    """Every traced operation, including those nested in a Compose's or a lazy transform's extra info."""
    found: list[dict[str, Any]] = []
    stack: list[Any] = list(operations)
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if "id" in item and "class" in item:
                found.append(item)
            stack.extend(v for v in item.values() if isinstance(v, dict | list))
        elif isinstance(item, list):
            stack.extend(item)
    return found
