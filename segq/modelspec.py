"""The pipeline every stage reads (ModelSpec): the network and its checkpoint, the sliding-window settings, and for a
MONAI bundle its folder, labels and trust. Made by one reader a format, under segq/pipeline/: toml.py (segq's own
model.toml) and bundle.py (MONAI bundles)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

from segq.errors import InputError

ARCHS = ("SwinUNETR", "UNet", "SegResNet")
MODES = ("gaussian", "constant")
PREPROCESS = ("none", "zscore")

BlendMode = Literal["gaussian", "constant"]

# The one schema of a model file: every key's type. bool is refused where a number is wanted (TOML's
# `true` is a Python int subclass); an integer overlap is taken as a float.
FIELD_TYPES: dict[str, type] = {
    "arch": str, "in_channels": int, "out_channels": int, "roi_size": int, "target_class": int, "checkpoint": str,
    "feature_size": int, "preprocess": str, "overlap": float, "sw_batch_size": int, "mode": str,
}
_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number"}


def check_types(data: dict[str, Any], where: str) -> dict[str, Any]:
    """``data`` with each value checked against FIELD_TYPES; InputError naming the first key of the wrong type."""
    checked = dict(data)
    for key, wanted in FIELD_TYPES.items():
        if key not in data:
            continue
        value = data[key]
        ok = isinstance(value, wanted) and not isinstance(value, bool)
        if wanted is float and isinstance(value, int) and not isinstance(value, bool):
            ok, checked[key] = True, float(value)
        if key == "checkpoint" and isinstance(value, Path):
            ok = True
        if not ok:
            example = {str: '"text"', int: "2", float: "0.5"}[wanted]
            raise InputError(f"{where}: {key} = {value!r} must be {_TYPE_NAMES[wanted]} (for example "
                             f"{key} = {example}, without quotes around numbers)")
    return checked


@dataclass(frozen=True)
class ModelSpec:
    """A parsed, validated model.toml. ``checkpoint`` is absolute once loaded."""

    arch: str
    in_channels: int
    out_channels: int
    roi_size: int
    target_class: int
    checkpoint: Path
    feature_size: int = 48
    preprocess: str = "none"
    overlap: float = 0.5
    sw_batch_size: int = 8
    mode: str = "gaussian"
    # What the mask is, for a DICOM SEG: a free-text label and SNOMED CT codes (a pydicom ``codes.SCT``
    # keyword, or "SCHEME:VALUE:Meaning"). They name the output, not the network: not in the checksum.
    segment_label: str = "tumour"
    segment_category: str = "MorphologicallyAbnormalStructure"
    segment_type: str = "Neoplasm"
    path: Path | None = None
    # The pipeline's format: "toml" (this file's: one target class, thresholded) or "bundle" (a MONAI bundle:
    # its transforms run at prepare and merge, every output channel crosses the parts; segq.pipeline.bundle).
    format: str = "toml"
    bundle: str = ""  # a bundle's root folder (on the shared storage for an unpacked .zip)
    roi_shape: tuple[int, ...] | None = None  # a bundle's ROI, which need not be a cube
    sigma_scale: float = 0.125
    padding_mode: str = "constant"  # MONAI's name: constant, replicate, reflect or circular
    labels: dict[str, str] | None = None  # label value -> name, for a bundle (a TOML model's is segment_label)
    trusted: bool = False  # a bundle run as code (--trust-model)

    @property
    def roi(self) -> tuple[int, int, int]:
        if self.roi_shape:
            x, y, z = (int(v) for v in self.roi_shape)
            return (x, y, z)
        return (self.roi_size,) * 3

    @property
    def is_bundle(self) -> bool:
        return self.format == "bundle"

    def label_names(self) -> dict[int, str]:
        """Every label the output can hold, by value (0 is the background)."""
        if self.labels:
            return {int(k): v for k, v in self.labels.items()}
        return {0: "background", 1: self.segment_label}

    def with_overrides(self, overlap: float | None = None, sw_batch_size: int | None = None,
                       mode: str | None = None) -> ModelSpec:
        """Command-line values win over the file's."""
        changes: dict[str, Any] = {}
        if overlap is not None:
            changes["overlap"] = overlap
        if sw_batch_size is not None:
            changes["sw_batch_size"] = sw_batch_size
        if mode is not None:
            changes["mode"] = mode
        spec = replace(self, **changes)
        spec.validate()
        return spec

    def validate(self) -> None:
        where = f"model file {self.path}" if self.path else "model spec"
        if self.is_bundle:
            self._validate_window(where)
            return
        check_types({k: getattr(self, k) for k in FIELD_TYPES}, where)
        if self.arch not in ARCHS:
            raise InputError(f"{where}: arch = {self.arch!r} is not one of {', '.join(ARCHS)}")
        for name in ("in_channels", "out_channels", "roi_size", "feature_size", "sw_batch_size"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"{where}: {name} must be a positive integer, got {getattr(self, name)!r}")
        if not 0 <= self.target_class < self.out_channels:
            raise InputError(f"{where}: target_class = {self.target_class} must be within 0..{self.out_channels - 1}")
        if self.arch == "SwinUNETR" and self.roi_size % 32:
            raise InputError(f"{where}: SwinUNETR needs roi_size divisible by 32, got {self.roi_size}")
        if self.arch == "SwinUNETR" and self.roi_size < 64:
            raise InputError(f"{where}: SwinUNETR's deepest stage needs roi_size >= 64, got {self.roi_size}")
        self._validate_window(where)
        for name in ("segment_category", "segment_type"):
            try:
                parse_code(str(getattr(self, name)))
            except ValueError as exc:
                raise InputError(f"{where}: {name}: {exc}") from exc
        if not str(self.segment_label).strip() or len(str(self.segment_label)) > 64:
            raise InputError(f"{where}: segment_label must be 1 to 64 characters, got {self.segment_label!r}")
        if self.preprocess not in PREPROCESS:
            raise InputError(f"{where}: preprocess = {self.preprocess!r} is not one of {', '.join(PREPROCESS)}")

    def _validate_window(self, where: str) -> None:
        if not 0 <= self.overlap < 1:
            raise InputError(f"{where}: overlap must be in [0, 1), got {self.overlap}")
        if self.mode not in MODES:
            raise InputError(f"{where}: mode = {self.mode!r} is not one of {', '.join(MODES)}")
        if self.sw_batch_size < 1:
            raise InputError(f"{where}: sw_batch_size must be a positive integer, got {self.sw_batch_size!r}")

    def network_config(self) -> dict[str, Any]:
        """What defines the network's weights and outputs (not how it is slid)."""
        if self.is_bundle:  # the bundle's config and metadata (read again: a change is a new model), with the weights
            return bundle_network_config(Path(self.bundle), self.trusted)
        return {
            "arch": self.arch, "in_channels": self.in_channels, "out_channels": self.out_channels,
            "feature_size": self.feature_size, "roi_size": self.roi_size, "target_class": self.target_class,
            "preprocess": self.preprocess,
        }

    def params(self) -> dict[str, Any]:
        """The sliding-window parameters recorded with each dataset."""
        return {"overlap": self.overlap, "sw_batch_size": self.sw_batch_size, "mode": self.mode}

    def checksum(self, file_hash: Callable[[Path], str] | None = None) -> str:
        """sha256 over the checkpoint bytes and the network config: names the exact model that ran.
        ``file_hash``: how the checkpoint's sha256 is found (`segq submit` remembers it, file_sha256_cached)."""
        return model_checksum(self.network_config(), self.checkpoint, file_hash or file_sha256)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["checkpoint"] = str(self.checkpoint)
        data["path"] = str(self.path) if self.path else None
        data["roi_shape"] = list(self.roi_shape) if self.roi_shape else None
        return data


def parse_code(text: str) -> tuple[str, str, str]:
    """A coded concept as (value, scheme, meaning) from a pydicom ``codes.SCT`` keyword or "SCHEME:VALUE:Meaning"."""
    parts = text.split(":", 2)
    if len(parts) == 3 and all(p.strip() for p in parts):
        return parts[1].strip(), parts[0].strip(), parts[2].strip()
    try:
        from pydicom.sr.codedict import codes
    except ImportError:  # the producer without the dicom extra: checked where the SEG is written
        return text, "SCT", text
    try:
        code = getattr(codes.SCT, text)
    except AttributeError:
        raise ValueError(f"{text!r} is neither a SNOMED CT keyword known to pydicom (e.g. Neoplasm, Liver) "
                         "nor SCHEME:VALUE:Meaning (e.g. SCT:108369006:Neoplasm)") from None
    return str(code.value), str(code.scheme_designator), str(code.meaning)


def model_checksum(network_config: dict[str, Any], checkpoint: Path,
                   file_hash: Callable[[Path], str] | None = None) -> str:
    """The model checksum: the network config (JSON, sorted keys) and the checkpoint's sha256."""
    digest = hashlib.sha256(json.dumps(network_config, sort_keys=True).encode())
    digest.update((file_hash or file_sha256)(checkpoint).encode())
    return digest.hexdigest()


HASH_CACHE_ENTRIES = 64


def file_identity(path: Path) -> list[int]:
    """What changes whenever a file's bytes may have: device, inode, size, mtime and ctime in ns (a write, a
    rename over it, or a `touch -d` all move ctime, which no tool sets back)."""
    st = path.stat()
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def file_sha256_cached(path: Path, cache: Path) -> str:
    """file_sha256 of a file that rarely changes (a checkpoint of hundreds of MB: a quarter of a second on each
    `segq submit`), remembered in the JSON file ``cache`` under its identity. A cache that cannot be read or
    written is ignored. The GPU worker still hashes the checkpoint itself before it loads it, so a wrong entry
    could only fail the job with "changed since it was submitted", never run other weights."""
    key, identity = str(path.resolve()), file_identity(path)
    try:
        entries = json.loads(cache.read_text())
        entry = entries.get(key) if isinstance(entries, dict) else None
        if isinstance(entry, dict) and entry.get("identity") == identity and isinstance(entry.get("sha256"), str):
            return str(entry["sha256"])
    except (OSError, ValueError):
        entries = {}
    digest = file_sha256(path)
    if file_identity(path) != identity:  # changed while it was read: remember nothing
        return digest
    entries = {k: v for k, v in (entries if isinstance(entries, dict) else {}).items() if k != key}
    entries[key] = {"identity": identity, "sha256": digest}
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(dict(list(entries.items())[-HASH_CACHE_ENTRIES:])))
        os.replace(tmp, cache)
    except OSError:
        pass
    return digest


def bundle_network_config(root: Path, trusted: bool) -> dict[str, Any]:
    """What defines a bundle's model besides its weights, read from its files as they are now."""
    return {"format": "bundle", "config": bundle_config_sha256(root), "trusted": trusted}


def bundle_config_sha256(root: Path) -> str:
    """sha256 over a bundle's inference config and metadata, as they are now."""
    digest = hashlib.sha256()
    for name in ("inference.json", "inference.yaml", "inference.yml", "metadata.json"):
        path = root / "configs" / name
        digest.update(name.encode() + (file_sha256(path).encode() if path.is_file() else b"-"))
    return digest.hexdigest()


def files_sha256(paths: list[Path] | tuple[Path, ...]) -> str:
    """A case's content hash: one file's own sha256, or for several, the sha256 of their hashes in channel order."""
    if len(paths) == 1:
        return file_sha256(paths[0])
    return hashlib.sha256("".join(file_sha256(p) for p in paths).encode()).hexdigest()


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def spec_from_dict(data: dict[str, Any]) -> ModelSpec:
    """Rebuild a spec recorded with a dataset (paths as strings)."""
    fields = dict(data)
    fields["checkpoint"] = Path(fields["checkpoint"])
    fields["path"] = Path(fields["path"]) if fields.get("path") else None
    if fields.get("roi_shape"):
        fields["roi_shape"] = tuple(int(v) for v in fields["roi_shape"])
    return ModelSpec(**fields)  # a spec recorded before the segment keys existed gets their defaults
