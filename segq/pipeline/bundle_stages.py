"""A MONAI bundle's stages, as segq runs them: read at submit, network on the worker, preprocessing at
prepare or on the GPU worker, postprocessing (with the inversion back to the scan's grid) where the logits are.

Where each runs, and why (docs/MODELS.md; bench/volume_costs.py times each step): a case that goes in one part
is only read on the coordinator (:func:`read_case`); the rest of the bundle's own preprocessing runs on its GPU
worker (:func:`preprocess_on_device`), which then inverts and decides it there. A case split over several parts
is preprocessed whole on the coordinator (:func:`preprocess_case`), its trace kept as JSON for ``Invertd``, and
decided at merge on the summed logits, as the bundle's evaluator runs it on ``sliding_window_inference``'s
output: activation, inversion and argmax or threshold in the bundle's own order.
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
    key, transform, _post = sections(spec)
    source: Any = [str(p) for p in files] if len(files) > 1 else str(files[0])
    image = _run(list(getattr(transform, "transforms", [transform])), {key: source}, str(files[0]))[key]
    meta = dict(getattr(image, "meta", {}) or {})
    operations = list(getattr(image, "applied_operations", []) or [])
    return _array_of(spec, image, str(files[0])), meta, operations


def _array_of(spec: ModelSpec, image: Any, where: str) -> np.ndarray:
    import torch

    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.ndim != 4 or array.shape[0] != spec.in_channels:
        raise InputError(f"{where}: the bundle's preprocessing gave an array of shape {list(array.shape)}; the "
                         f"network takes {spec.in_channels} channel(s) of a 3D volume")
    return np.ascontiguousarray(array, dtype=np.float32)


def save_context(ws: Path, meta: dict[str, Any], operations: list[Any]) -> None:
    trace.save(ws / "trace.json", meta, operations)


def load_context(ws: Path) -> tuple[dict[str, Any], list[Any]]:
    return trace.load(ws / "trace.json")


# The leading transforms that read a case: what a coordinator runs of a volume whose preprocessing runs on its
# GPU worker (see split_preprocessing). They decompress files; nothing after them needs the files.
READERS = frozenset({"LoadImaged", "LoadImage", "EnsureChannelFirstd", "EnsureChannelFirst", "EnsureTyped",
                     "EnsureType"})


def split_preprocessing(spec: ModelSpec) -> tuple[list[Any], list[Any]]:
    """The bundle's preprocessing as (readers, rest): the leading LoadImaged / EnsureChannelFirstd, and the
    transforms after them (orientation, spacing, intensity, crop), which run as well on a device tensor.

    A one-part volume runs the readers on the coordinator and the rest on its GPU worker
    (bench/volume_costs.py, a 512x512x110 CT on a 2-core CPU: LoadImaged 0.95 s, Spacingd 1.21 s,
    ScaleIntensityRanged 0.17 s; on the device the rest takes milliseconds). A preprocessing that does not
    begin with a reader, or is not a flat Compose, has no rest: all of it runs on the coordinator.
    """
    _key, pre, _post = sections(spec)
    transforms = list(getattr(pre, "transforms", []) or [])
    cut = 0
    while cut < len(transforms) and type(transforms[cut]).__name__ in READERS:
        cut += 1
    if cut == 0 or any(hasattr(t, "transforms") for t in transforms[cut:]):
        return transforms, []
    return transforms[:cut], transforms[cut:]


def _run(transforms: list[Any], data: dict[str, Any], where: str) -> dict[str, Any]:
    from monai.transforms import Compose

    try:
        return dict(Compose(transforms)(data))
    except Exception as exc:  # MONAI wraps a transform's failure in a RuntimeError naming the transform
        reason = " ".join(str(exc).split())[-300:]
        raise InputError(f"{where}: the bundle's preprocessing failed ({reason})") from exc


def read_case(spec: ModelSpec, files: list[Path]) -> tuple[np.ndarray, dict[str, Any], list[Any]] | None:
    """The case as the bundle's readers give it, on its own grid: (C, X, Y, Z) float32, meta and trace; None
    where they do not give the network's channels (a bundle that adds its channel axis later)."""
    from monai.data import MetaTensor

    key, _pre, _post = sections(spec)
    readers, _rest = split_preprocessing(spec)
    source: Any = [str(p) for p in files] if len(files) > 1 else str(files[0])
    image = _run(readers, {key: source}, str(files[0]))[key]
    if not isinstance(image, MetaTensor) or image.ndim != 4 or image.shape[0] != spec.in_channels:
        return None
    return _array_of(spec, image, str(files[0])), dict(image.meta), list(image.applied_operations)


def preprocess_on_device(spec: ModelSpec, array: np.ndarray, meta: dict[str, Any], operations: list[Any],
                         device: Any) -> tuple[Any, dict[str, Any], list[Any]]:
    """The rest of the preprocessing (after :func:`read_case`) on ``device``: the case on the model's grid as a
    (C, X, Y, Z) float32 device tensor, with the meta and trace that invert it."""
    import torch
    from monai.data import MetaTensor

    key, _pre, _post = sections(spec)
    _readers, rest = split_preprocessing(spec)
    tensor = torch.from_numpy(np.ascontiguousarray(array)).to(device, non_blocking=True)
    image = _run(rest, {key: MetaTensor(tensor, meta=dict(meta), applied_operations=list(operations))},
                 "the case")[key]
    grid = torch.as_tensor(image).float()
    if grid.ndim != 4 or grid.shape[0] != spec.in_channels:
        raise InputError(f"the bundle's preprocessing gave an array of shape {list(grid.shape)}; the network takes "
                         f"{spec.in_channels} channel(s) of a 3D volume")
    return grid.as_tensor() if isinstance(grid, MetaTensor) else grid, dict(image.meta), list(
        image.applied_operations)


def estimated_grid(spec: ModelSpec, affine: np.ndarray, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The case's shape on the model's grid, from its affine and the rest's Orientationd and Spacingd, without
    resampling it: what decides its parts before its preprocessing runs on a GPU worker. A crop is not counted,
    so this is at most the true grid (a pad that grows it matters only for a volume smaller than a window)."""
    from nibabel import orientations

    _readers, rest = split_preprocessing(spec)
    spatial = np.asarray(affine, dtype=np.float64)[:3, :3]
    sizes, spacing = [float(n) for n in shape], list(np.sqrt((spatial**2).sum(axis=0)))
    for transform in rest:
        name = type(transform).__name__
        if name == "Orientationd" and getattr(transform.ornt_transform, "axcodes", None):
            labels = transform.ornt_transform.labels
            target = orientations.axcodes2ornt(transform.ornt_transform.axcodes, labels)
            moved = orientations.ornt_transform(orientations.io_orientation(np.asarray(affine)), target)
            order = [int(axis) for axis in moved[:, 0]]
            sizes = [sizes[order.index(j)] for j in range(3)]
            spacing = [spacing[order.index(j)] for j in range(3)]
        elif name == "Spacingd":
            pixdim = list(np.atleast_1d(transform.spacing_transform.pixdim).astype(float))
            pixdim += [pixdim[-1]] * (3 - len(pixdim))
            for j in range(3):
                if pixdim[j] > 0:
                    sizes[j], spacing[j] = sizes[j] * spacing[j] / pixdim[j], pixdim[j]
    return tuple(max(1, round(n)) for n in sizes)


def postprocess(spec: ModelSpec, logits: Any, context: tuple[dict[str, Any], list[Any]],
                spatial_shape: tuple[int, ...]) -> Any:
    """The bundle's postprocessing over the merged logits (K, X, Y, Z): the label map on the scan's grid, as a
    uint8 (uint16 past 255) tensor where the logits are: an array's on the CPU, a device tensor's on its device
    (a GPU worker then checks and casts it there, and only the label map leaves the device)."""
    import torch
    from monai.data import MetaTensor

    channels = int(logits.shape[0])
    data, post = postprocess_inputs(spec, logits, context)
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


def postprocess_inputs(spec: ModelSpec, logits: Any, context: tuple[dict[str, Any], list[Any]]
                       ) -> tuple[dict[str, Any], Any]:
    """What the bundle's postprocessing runs on, as its evaluator hands it over: the prediction, and the image
    carrying the preprocessing's meta and trace (``context``: :func:`load_context`'s, or the device's own) for
    Invertd; with the postprocessing."""
    import torch
    from monai.data import MetaTensor
    from monai.utils import TraceKeys

    meta, operations = context
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
