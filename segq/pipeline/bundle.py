"""MONAI bundles as segq pipelines: ``configs/inference.json`` (or ``.yaml``) and ``configs/metadata.json``.

segq reads the bundle with MONAI's own ``ConfigParser`` and keeps the bundle's transforms: its
``preprocessing`` runs on the coordinator (prepare), its ``postprocessing`` at merge, with the bundle's
``Invertd`` bringing the labels back to the scan's own grid in the bundle's order. segq's own machinery
replaces the evaluator, data loader, handlers and ``SaveImaged``; the ``inferer``'s window settings
become the plan's. What of the config runs is decided by segq.pipeline.policy.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segq.errors import InputError
from segq.pipeline import policy

logger = logging.getLogger("segq.bundle")

CONFIG_NAMES = ("inference.json", "inference.yaml", "inference.yml")
WEIGHTS_NAMES = ("model.pt", "model.ts")
# SlidingWindowInferer's arguments that shape the result, and those that only say where or how fast it runs.
INFERER_KEYS = ("roi_size", "sw_batch_size", "overlap", "mode", "sigma_scale", "padding_mode", "cval")
INFERER_IGNORED = ("_target_", "device", "sw_device", "progress", "cache_roi_weight_map", "cpu_thresh",
                   "buffer_steps", "buffer_dim", "with_coord")
PADDING_MODES = {"constant": "constant", "replicate": "edge", "reflect": "reflect", "circular": "wrap"}
# Postprocessing that segq runs at merge, on the merged prediction, in the bundle's order.
PLACEABLE = frozenset({
    "Activationsd", "Invertd", "AsDiscreted", "KeepLargestConnectedComponentd", "Lambdad", "EnsureTyped",
    "CastToTyped", "SqueezeDimd", "FillHolesd", "RemoveSmallObjectsd", "LabelFilterd", "MapLabelValued",
    "CopyItemsd", "DeleteItemsd", "ToDeviced", "ToTensord", "ToNumpyd", "Identityd",
})
# Postprocessing that segq's own machinery replaces: dropped, and said so.
REPLACED = {"SaveImaged": "segq writes the label map itself (uint8 NIfTI on the input's grid, label names "
                          "in a JSON sidecar and a header extension)"}


@dataclass(frozen=True)
class BundleFiles:
    root: Path
    config: Path
    metadata: Path | None
    weights: Path


def is_bundle(path: Path) -> bool:
    return path.suffix == ".zip" or (path.is_dir() and (path / "configs").is_dir())


def unpack(archive: Path, into: Path) -> Path:
    """A bundle's .zip unpacked (once, by content) under ``into``; members that would land outside are refused."""
    from segq.modelspec import file_sha256

    target = into / f"{archive.stem}-{file_sha256(archive)[:16]}"
    if target.is_dir():
        return _bundle_root(target, archive)
    into.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=into))  # one a submit: two may race here
    try:
        with zipfile.ZipFile(archive) as zf:
            for member in zf.namelist():
                resolved = (target / member).resolve()
                if not resolved.is_relative_to(target.resolve()):
                    raise InputError(f"bundle {archive}: member {member!r} would be written outside the bundle")
            zf.extractall(staging)
        try:
            staging.rename(target)
        except OSError:
            if not target.is_dir():  # not a submit that unpacked the same zip first
                raise
    except zipfile.BadZipFile as exc:
        raise InputError(f"bundle {archive} is not a readable zip file ({exc})") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return _bundle_root(target, archive)


def _bundle_root(folder: Path, where: Path) -> Path:
    """The folder that holds ``configs/``: the zip's top folder (MONAI's layout) or the zip itself."""
    if (folder / "configs").is_dir():
        return folder
    inner = [p for p in folder.iterdir() if (p / "configs").is_dir()]
    if len(inner) != 1:
        raise InputError(f"bundle {where} has no configs/ folder (a MONAI bundle holds configs/inference.json)")
    return inner[0]


def find_files(root: Path) -> BundleFiles:
    configs = root / "configs"
    config = next((configs / n for n in CONFIG_NAMES if (configs / n).is_file()), None)
    if config is None:
        raise InputError(f"bundle {root}: no configs/inference.json or inference.yaml; segq runs a bundle's "
                         "inference config")
    metadata = configs / "metadata.json"
    weights = next((root / "models" / n for n in WEIGHTS_NAMES if (root / "models" / n).is_file()), None)
    if weights is None:
        raise InputError(f"bundle {root}: no models/model.pt or models/model.ts; put the trained weights there")
    return BundleFiles(root, config, metadata if metadata.is_file() else None, weights)


def read_config(path: Path) -> dict[str, Any]:
    from monai.bundle import ConfigParser

    try:
        config = ConfigParser.load_config_file(path)
    except Exception as exc:  # json, yaml and MONAI's duplicate-key checks raise their own errors
        raise InputError(f"bundle config {path} cannot be read ({' '.join(str(exc).split())[:200]})") from exc
    if not isinstance(config, dict):
        raise InputError(f"bundle config {path} is not a mapping of config items")
    return dict(config)


def _transforms(config: dict[str, Any], key: str) -> list[Any]:
    section = config.get(key)
    if section is None:
        return []
    if isinstance(section, dict) and isinstance(section.get("transforms"), list):
        return list(section["transforms"])
    if isinstance(section, list):
        return section
    raise InputError(f"bundle config key {key!r} must be a Compose of transforms")


def _name(transform: Any) -> str:
    target = transform.get("_target_", "") if isinstance(transform, dict) else ""
    return str(target).rsplit(".", 1)[-1]


def placed_config(config: dict[str, Any], where: Path) -> dict[str, Any]:
    """The config with its postprocessing as segq runs it: replaced transforms dropped, any other it cannot place
    refused by name."""
    kept = []
    for index, transform in enumerate(_transforms(config, "postprocessing")):
        name = _name(transform)
        if name in REPLACED:
            logger.debug("bundle %s: postprocessing#transforms#%d %s is not run: %s", where, index, name,
                         REPLACED[name])
            continue
        if name not in PLACEABLE:
            raise InputError(f"bundle {where}: postprocessing#transforms#{index} {name or transform!r} is not a "
                             f"transform segq can run at merge (it runs {', '.join(sorted(PLACEABLE))}); remove it "
                             "from the bundle's postprocessing or replace it with one of those")
        kept.append(transform)
    placed = dict(config)
    if "postprocessing" in config:
        section = config["postprocessing"]
        placed["postprocessing"] = {**section, "transforms": kept} if isinstance(section, dict) else kept
    return placed


def parsed(config: dict[str, Any], files: BundleFiles, trusted: bool) -> Any:
    """A MONAI ConfigParser over only what segq runs of ``config`` (segq.pipeline.policy)."""
    from monai.bundle import ConfigParser

    roots = ["network_def", "preprocessing"] + [f"inferer#{k}" for k in INFERER_KEYS
                                                  if k in (config.get("inferer") or {})]
    if "postprocessing" in config:
        roots.append("postprocessing")
    kept = policy.reachable(config, roots, trusted)
    if trusted and "imports" in config:
        kept["imports"] = config["imports"]
    kept["bundle_root"] = str(files.root)
    parser = ConfigParser(kept)
    return parser


def labels_from_metadata(metadata: Path | None, out_channels: int) -> dict[str, str]:
    """Label names by value from ``network_data_format.outputs.pred.channel_def``; ``label N`` where none is given."""
    names: dict[str, str] = {}
    if metadata is not None:
        try:
            document = json.loads(metadata.read_text())
            channel_def = document["network_data_format"]["outputs"]["pred"].get("channel_def") or {}
            names = {str(int(k)): str(v) for k, v in channel_def.items()}
        except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
            logger.warning("bundle metadata %s: no usable channel_def (%s); labels are numbered", metadata, exc)
    for value in range(out_channels):
        names.setdefault(str(value), "background" if value == 0 else f"label {value}")
    return names


def inferer_settings(parser: Any, config: dict[str, Any], where: Path) -> dict[str, Any]:
    inferer = config.get("inferer") or {}
    unknown = sorted(set(inferer) - set(INFERER_KEYS) - set(INFERER_IGNORED))
    if unknown:
        raise InputError(f"bundle {where}: inferer setting(s) {', '.join(unknown)} are not ones segq's sliding "
                         f"windows honour ({', '.join(INFERER_KEYS)})")
    target = _name(inferer) if inferer else "SlidingWindowInferer"
    if target != "SlidingWindowInferer":
        raise InputError(f"bundle {where}: inferer {target} is not a SlidingWindowInferer, the one segq distributes")
    values = {k: parser.get_parsed_content(f"inferer#{k}") for k in INFERER_KEYS if k in inferer}
    if "roi_size" not in values:
        raise InputError(f"bundle {where}: the inferer has no roi_size")
    roi = [int(v) for v in np.broadcast_to(np.asarray(values["roi_size"]), (3,))]
    padding = str(values.get("padding_mode", "constant"))
    if padding not in PADDING_MODES:
        raise InputError(f"bundle {where}: inferer padding_mode {padding!r} is not one of {', '.join(PADDING_MODES)}")
    if float(values.get("cval", 0.0)) != 0.0:
        raise InputError(f"bundle {where}: inferer cval {values['cval']} is not supported (segq pads with zeros)")
    return {"roi": roi, "sw_batch_size": int(values.get("sw_batch_size", 1)),
            "overlap": float(values.get("overlap", 0.25)), "mode": str(values.get("mode", "constant")),
            "sigma_scale": float(values.get("sigma_scale", 0.125)), "padding_mode": padding}


def network_channels(parser: Any, where: Path) -> tuple[str, int, int]:
    """The network's class name and its input and output channel counts, read from ``network_def``."""
    config = parser.get("network_def")
    if not isinstance(config, dict):
        raise InputError(f"bundle {where}: network_def is not a component with a _target_")
    counts = []
    for key in ("in_channels", "out_channels"):
        value = parser.get_parsed_content(f"network_def#{key}") if key in config else None
        if not isinstance(value, int):
            raise InputError(f"bundle {where}: network_def#{key} must be an integer, got {value!r}")
        counts.append(value)
    return _name(config), counts[0], counts[1]
