"""Tiny MONAI bundles in the shapes of five Model Zoo bundles, synthetic cases for them, and MONAI's own runner.

Importable helper (no tests here). ``make_bundle`` writes a bundle folder whose ``configs/inference.json`` and
``configs/metadata.json`` are the REAL files of a Model Zoo bundle (Project-MONAI/model-zoo at commit
dfae206df112837d817e78d3727c9f32b3b52e82, embedded below verbatim as ``_REAL_INFERENCE`` / ``_REAL_METADATA``
because CI has no copy of the zoo) with only the changes listed here, applied by ``tiny_inference_config``;
``configs/logging.conf`` is the zoo's (identical in all five); ``models/model.pt`` holds random weights.
``make_case`` writes synthetic NIfTI inputs; ``run_bundle_oracle`` runs ``python -m monai.bundle run`` on them.

Changes to the real inference configs (everything else, every transform, ``$`` expression, ``imports``,
``amp: true``, ``device``, handlers, is kept; metadata.json is not changed at all):

* all five: ``dataloader.num_workers`` -> 0 (4, or 1 for wholebody: no worker processes in tests).
* spleen (``models/spleen_ct_segmentation``): UNet ``channels`` [16,32,64,128,256] -> [4,8,16], ``strides``
  [2,2,2,2] -> [2,2]; ``inferer.roi_size`` [96,96,96] -> [32,32,32].
* btcv (``models/swin_unetr_btcv_segmentation``): SwinUNETR ``feature_size`` 48 -> 12; ``img_size: 96`` removed
  (MONAI 1.5 removed that argument: the real config raises TypeError on MONAI >= 1.5); ``roi_size`` -> [64,64,64]
  (the smallest that works: at 32 the deepest stage is 1x1x1 and InstanceNorm refuses it).
  ``LoadImaged``'s ``"reader": "ITKReader"`` removed: MONAI 1.6 raises OptionalImportError for a named reader
  whose package is missing, and itk is no dependency of segq; without it LoadImaged reads .nii.gz with nibabel.
* brats (``models/brats_mri_segmentation``): SegResNet ``init_filters`` 16 -> 8 (its GroupNorm has 8 groups),
  ``blocks_down`` [1,2,2,4] -> [1,1,1], ``blocks_up`` [1,1,1] -> [1,1]; ``roi_size`` [240,240,160] -> [32,32,16]
  (smaller than a case, so several windows). ``data_list_file_path`` still defaults to configs/datalist.json,
  which (as in the zoo) the bundle does not ship: pass a datalist file.
* wholebody (``models/wholeBody_ct_segmentation``): SegResNet ``init_filters`` 32 -> 8, ``blocks_down``
  [1,2,2,4] -> [1,1,1], ``blocks_up`` [1,1,1] -> [1,1] (``out_channels`` stays 105); ``roi_size`` -> [32,32,32].
* prostate (``models/prostate_mri_anatomy``): UNet ``channels`` [16..512] -> [4,8,16], ``strides`` [2]*5 -> [2,2],
  ``num_res_units`` 4 -> 1; ``roi_size`` -> [32,32,32]. Its ``datalist`` reads ``@dataset_dir + 'test.csv'``
  (column ``t2``) with pandas, which segq does not depend on: ``$import pandas as pd`` -> ``$import csv`` and
  the datalist is the same list read with ``csv.DictReader`` (same file, same column, same concatenation).

What the tiny nets predict (random weights from ``torch.manual_seed(seed)``, then the final conv is rescaled per
output channel, and its bias shifted, so that on a ``make_case`` volume of that shape every channel's logit has
mean 0 and spread ~4 over the sliding windows: see ``_calibrate``). With seed 0 on the default case the label
maps hold, after the bundle's own postprocessing:

* spleen: 0 and 1 about half and half, in no anatomical pattern (air 1:68%, soft tissue 50/50, blob 0:70%).
* btcv: all 14 labels; each region a mix (blob mostly 2, 12, 10; air mostly 4, 1).
* brats: 0, 1, 2 and 4; the blob almost all 4 (enhancing tumour), the rest of the head a mix of all four, and
  the zero background mostly 4 and 2 (the net is not masked: background voxels get labels too).
* wholebody: ~60 of the 105 labels; air mostly 98 and 99, the rest a patchwork of many labels.
* prostate: 0, 1 and 2 (blob mostly 1), but as FRACTIONS: the real config inverts its Spacingd with bilinear
  interpolation after the argmax (Invertd nearest_interp false), so the saved float32 map holds thousands of
  distinct values between the labels; round it to compare labels.

Oracle runs take ~8-18 s each on a 2-core CPU (btcv, prostate the slowest), of which ~5 s (more on a loaded
machine) is importing MONAI in the subprocess. make_bundle takes 0.5-5 s (the calibration; cached per process).
prostate's KeepLargestConnectedComponentd needs scikit-image on CPU (``skimage.measure.label``).
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from bench import bundle_dataset as bench_bundle

SHAPES = ("spleen", "btcv", "brats", "wholebody", "prostate")

#: the Model Zoo folder (models/<name>) each shape's configs come from
ZOO_NAMES = {
    "spleen": "spleen_ct_segmentation",
    "btcv": "swin_unetr_btcv_segmentation",
    "brats": "brats_mri_segmentation",
    "wholebody": "wholeBody_ct_segmentation",
    "prostate": "prostate_mri_anatomy",
}
ZOO_COMMIT = "dfae206df112837d817e78d3727c9f32b3b52e82"

WEIGHTS = ("state_dict", "checkpoint", "torchscript")
_CT = {"spleen", "btcv", "wholebody"}

#: the zoo's configs/logging.conf (the same file in all five bundles; bench/bundle_dataset.py holds it verbatim)
LOGGING_CONF = bench_bundle.LOGGING_CONF


def _check_shape(shape: str) -> None:
    if shape not in SHAPES:
        raise ValueError(f"unknown bundle shape {shape!r}; one of {SHAPES}")


def real_inference_config(shape: str) -> dict[str, Any]:
    """The zoo's configs/inference.json for ``shape``, verbatim (a copy)."""
    _check_shape(shape)
    return copy.deepcopy(_REAL_INFERENCE[shape])


def real_metadata(shape: str) -> dict[str, Any]:
    """The zoo's configs/metadata.json for ``shape``, verbatim (a copy); make_bundle writes it unchanged."""
    _check_shape(shape)
    return copy.deepcopy(_REAL_METADATA[shape])


def tiny_inference_config(shape: str) -> dict[str, Any]:
    """The real inference config with the changes of this module's docstring (and nothing else)."""
    cfg = real_inference_config(shape)
    net = cfg["network_def"]
    roi: list[int]
    if shape == "spleen":
        net["channels"], net["strides"] = [4, 8, 16], [2, 2]
        roi = [32, 32, 32]
    elif shape == "btcv":
        net["feature_size"] = 12
        del net["img_size"]  # removed from SwinUNETR in MONAI 1.5: TypeError there
        roi = [64, 64, 64]  # 32 leaves a 1x1x1 deepest stage, which InstanceNorm refuses
        # MONAI >= 1.6 raises OptionalImportError for a named reader whose package is missing, and itk is no
        # dependency of segq: LoadImaged picks its reader itself (nibabel for .nii.gz)
        load = cfg["preprocessing"]["transforms"][0]
        assert load["_target_"] == "LoadImaged" and load.pop("reader") == "ITKReader"
    elif shape == "brats":
        net["init_filters"], net["blocks_down"], net["blocks_up"] = 8, [1, 1, 1], [1, 1]
        roi = [32, 32, 16]
    elif shape == "wholebody":
        net["init_filters"], net["blocks_down"], net["blocks_up"] = 8, [1, 1, 1], [1, 1]
        roi = [32, 32, 32]
    else:  # prostate
        net["channels"], net["strides"], net["num_res_units"] = [4, 8, 16], [2, 2], 1
        roi = [32, 32, 32]
        # pandas is no dependency of segq: the same test.csv, column t2, read with the csv module
        cfg["imports"] = ["$import csv" if i == "$import pandas as pd" else i for i in cfg["imports"]]
        assert cfg["datalist"] == "$list(@dataset_dir + pd.read_csv(@dataset_dir + 'test.csv').t2)"
        cfg["datalist"] = "$list(@dataset_dir + r['t2'] for r in csv.DictReader(open(@dataset_dir + 'test.csv')))"
    cfg["inferer"]["roi_size"] = roi
    cfg["dataloader"]["num_workers"] = 0
    return cfg


# --------------------------------------------------------------------------------------------- bundles


def make_bundle(shape: str, root: Path, *, seed: int = 0, fmt: str = "json", weights: str = "state_dict") -> Path:
    """Write ``root/<shape>_bundle/`` (configs/inference.{json,yaml}, metadata.json, logging.conf, models/).

    ``weights``: "state_dict" writes ``torch.save(net.state_dict())`` to models/model.pt; "checkpoint" writes
    ``{"model": state_dict}`` there; "torchscript" writes the state dict to model.pt (which inference.json's
    CheckpointLoader reads, as in the zoo, whose bundles ship both) and ``torch.jit.script(net)`` to
    models/model.ts; ValueError for btcv (SwinUNETR does not script). The same seed gives the same weights
    whatever ``fmt`` and ``weights`` are. An existing ``root/<shape>_bundle`` is replaced.
    """
    import torch

    _check_shape(shape)
    if fmt not in ("json", "yaml"):
        raise ValueError(f"fmt must be 'json' or 'yaml', not {fmt!r}")
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, not {weights!r}")
    if weights == "torchscript" and shape == "btcv":
        raise ValueError("SwinUNETR does not script (torch.jit.script fails on its forward)")
    cfg = tiny_inference_config(shape)
    bundle = Path(root) / f"{shape}_bundle"
    if bundle.exists():
        shutil.rmtree(bundle)
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    if fmt == "json":
        (bundle / "configs" / "inference.json").write_text(json.dumps(cfg, indent=4) + "\n")
    else:
        import yaml

        (bundle / "configs" / "inference.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False, width=1000))
    (bundle / "configs" / "metadata.json").write_text(json.dumps(real_metadata(shape), indent=4) + "\n")
    (bundle / "configs" / "logging.conf").write_text(LOGGING_CONF)

    net = _tiny_network(shape, seed)
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    torch.save({"model": state} if weights == "checkpoint" else state, bundle / "models" / "model.pt")
    if weights == "torchscript":
        torch.jit.save(torch.jit.script(net.eval()), str(bundle / "models" / "model.ts"))
    return bundle


_NETWORKS: dict[tuple[str, int], dict[str, Any]] = {}  # (shape, seed) -> calibrated state dict


def _tiny_network(shape: str, seed: int) -> Any:
    """network_def of the tiny config, instantiated by MONAI's ConfigParser, seeded and calibrated (cached)."""
    import torch
    from monai.bundle import ConfigParser

    cfg = tiny_inference_config(shape)
    parser = ConfigParser(cfg)
    torch.manual_seed(seed)
    net = parser.get_parsed_content("network_def", instantiate=True)
    key = (shape, seed)
    if key not in _NETWORKS:
        _calibrate(shape, cfg, net, seed)
        _NETWORKS[key] = {k: v.detach().clone() for k, v in net.state_dict().items()}
    net.load_state_dict(_NETWORKS[key])
    return net.eval()


def _final_conv(net: Any, out_channels: int) -> Any:
    """The network's last Conv3d / ConvTranspose3d with ``out_channels`` outputs (its output layer)."""
    import torch

    last = None
    for module in net.modules():
        if isinstance(module, torch.nn.Conv3d | torch.nn.ConvTranspose3d) and module.out_channels == out_channels:
            last = module
    if last is None:
        raise RuntimeError(f"no output conv with {out_channels} channels in {type(net).__name__}")
    return last


def _calibrate(shape: str, cfg: dict[str, Any], net: Any, seed: int, spread: float = 4.0) -> None:
    """Rescale the output conv per channel and shift its bias so that each output channel's logit has mean 0
    and standard deviation ~``spread`` over the windows of a make_case volume (preprocessed by the bundle's own
    preprocessing, windows by its own inferer). A random tiny net otherwise gives one class everywhere.

    The output is ``conv(x) + rest`` (``rest`` is UNet's identity residual, else 0); ``rest`` does not depend
    on the conv, so it is measured and allowed for.
    """
    import torch
    from monai.bundle import ConfigParser

    out_channels = cfg["network_def"]["out_channels"]
    conv = _final_conv(net, out_channels)
    net.eval()
    convs: list[Any] = []
    outs: list[Any] = []
    h1 = conv.register_forward_hook(lambda m, i, o: convs.append(o.detach()))
    h2 = net.register_forward_hook(lambda m, i, o: outs.append(o.detach()))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            files = make_case(shape, Path(tmp), "calib", seed=seed)
            parser = ConfigParser(copy.deepcopy(cfg))
            parser["bundle_root"] = tmp
            pre = parser.get_parsed_content("preprocessing")
            inferer = parser.get_parsed_content("inferer")
            item = pre({"image": [str(f) for f in files] if shape == "brats" else str(files[0])})
            with torch.no_grad():
                inferer(item["image"].unsqueeze(0).as_tensor().float(), net)
    finally:
        h1.remove()
        h2.remove()
    bias = conv.bias.detach()
    c = torch.cat([x.transpose(0, 1).reshape(out_channels, -1) for x in convs], 1)
    o = torch.cat([x.transpose(0, 1).reshape(out_channels, -1) for x in outs], 1)
    rest = o - c
    c = c - bias[:, None]  # the conv without its bias
    scale = spread / c.std(1).clamp_min(1e-6)
    new_bias = -(scale[:, None] * c + rest).mean(1)
    with torch.no_grad():
        w = conv.weight
        # Conv3d weight: (out, in, k, k, k); ConvTranspose3d: (in, out, k, k, k)
        dim = 1 if isinstance(conv, torch.nn.ConvTranspose3d) else 0
        shape_ = [1] * w.dim()
        shape_[dim] = out_channels
        w.mul_(scale.reshape(shape_))
        conv.bias.copy_(new_bias)


def make_bundle_zip(bundle_dir: Path) -> Path:
    """Zip ``bundle_dir`` as monai.bundle does (one top folder named after the bundle): ``<bundle_dir>.zip``."""
    bundle_dir = Path(bundle_dir)
    target = bundle_dir.with_name(bundle_dir.name + ".zip")
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(bundle_dir.rglob("*")):
            if path.is_file():
                zf.write(path, str(Path(bundle_dir.name) / path.relative_to(bundle_dir)))
    return target


# ----------------------------------------------------------------------------------------------- cases


def case_affine(orientation: str, spacing: tuple[float, float, float]) -> np.ndarray:
    """4x4 voxel-to-RAS affine: "RAS" diag(sx,sy,sz); "LPS" diag(-sx,-sy,sz); "oblique" LPS rotated 17 deg
    about z and 15 deg about x, origin (12.5, -30.0, 40.0)."""
    sx, sy, sz = (float(s) for s in spacing)
    affine = np.eye(4)
    if orientation == "RAS":
        affine[:3, :3] = np.diag([sx, sy, sz])
    elif orientation == "LPS":
        affine[:3, :3] = np.diag([-sx, -sy, sz])
    elif orientation == "oblique":
        a, b = math.radians(17.0), math.radians(15.0)
        rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
        rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
        affine[:3, :3] = rz @ rx @ np.diag([-sx, -sy, sz])
        affine[:3, 3] = [12.5, -30.0, 40.0]
    else:
        raise ValueError(f"orientation must be 'LPS', 'RAS' or 'oblique', not {orientation!r}")
    return affine


def _ellipsoid(size: tuple[int, int, int], centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
    grid = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in size], indexing="ij")
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii, strict=True)) <= 1.0


def _phantom(size: tuple[int, int, int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Masks of a body (an ellipsoid touching 94% of each axis: ~45% of the voxels), a blob inside it and a
    rim (the body's outer 15%)."""
    dims = np.array(size, dtype=np.float64)
    body = _ellipsoid(size, dims / 2 - 0.5, np.maximum(dims * 0.47, 1.5))
    centre = dims * (0.5 + rng.uniform(-0.12, 0.12, 3))
    blob = _ellipsoid(size, centre, np.maximum(dims * rng.uniform(0.14, 0.2, 3), 1.5)) & body
    rim = body & ~_ellipsoid(size, dims / 2 - 0.5, np.maximum(dims * 0.40, 1.0))
    return body, blob, rim


def _write_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, str(path))
    return path


def make_case(shape: str, root: Path, name: str, *, orientation: str = "LPS",
              spacing: tuple[float, float, float] = (0.8, 0.9, 2.5), size: tuple[int, int, int] = (48, 44, 20),
              seed: int = 0) -> list[Path]:
    """Write one synthetic case for ``shape``'s bundle under ``root``; return its file(s).

    CT shapes (spleen, btcv, wholebody): ``<name>.nii.gz``, int16 HU: air -1000 around a body of soft tissue
    (~40 HU) with a fat rim (~-90 HU) and an enhancing blob (~130 HU), all inside spleen's [-57, 164] and btcv's
    [-175, 250] windows except the air. prostate: ``<name>.nii.gz``, float32 MR-like (noise ~10 around a body
    ~300 with a blob ~650). brats: ``<name>_0000.nii.gz`` .. ``_0003.nii.gz`` (T1c, T1, T2, FLAIR, the metadata's
    channel order), float32, exactly 0 outside the head, each modality with its own contrast for the blob.
    """
    _check_shape(shape)
    sx, sy, sz = (int(s) for s in size)
    size = (sx, sy, sz)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    affine = case_affine(orientation, spacing)
    rng = np.random.default_rng(seed)
    body, blob, rim = _phantom(size, rng)
    if shape in _CT:
        hu = np.full(size, -1000.0)
        hu[body] = 40.0
        hu[rim] = -90.0
        hu[blob] = 130.0
        hu += rng.normal(0.0, 12.0, size)
        data = np.clip(np.round(hu), -1024, 3071).astype(np.int16)
        return [_write_nifti(root / f"{name}.nii.gz", data, affine)]
    if shape == "prostate":
        mr = np.where(body, 300.0, 0.0) + np.where(blob, 350.0, 0.0) - np.where(rim, 120.0, 0.0)
        mr = np.abs(mr + rng.normal(0.0, 10.0, size)).astype(np.float32)
        return [_write_nifti(root / f"{name}.nii.gz", mr, affine)]
    files = []
    for channel, (tissue, lesion, edge) in enumerate([(400, 900, 250), (500, 350, 450), (300, 800, 600),
                                                      (350, 700, 200)]):
        mr = np.where(blob, lesion, np.where(rim, edge, tissue)) + rng.normal(0.0, 15.0, size)
        mr = np.where(body, np.abs(mr), 0.0).astype(np.float32)  # zero outside the head
        files.append(_write_nifti(root / f"{name}_{channel:04d}.nii.gz", mr, affine))
    return files


# ---------------------------------------------------------------------------------------------- oracle


def _config_file(bundle_dir: Path) -> Path:
    for ext in (".json", ".yaml", ".yml"):
        path = bundle_dir / "configs" / f"inference{ext}"
        if path.is_file():
            return path
    raise FileNotFoundError(f"no configs/inference.json or .yaml in {bundle_dir}")


def _stem(path: Path | str) -> str:
    name = Path(path).name
    for ext in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


def _link(src: Path, dst: Path) -> None:
    try:
        os.symlink(Path(src).resolve(), dst)
    except OSError:
        shutil.copyfile(src, dst)


def run_bundle_oracle(bundle_dir: Path, cases: list[list[Path]], out_dir: Path, timeout: float = 600) -> list[Path]:
    """Run ``python -m monai.bundle run`` (MONAI's own runner, CPU only) on ``cases``; return the label maps.

    Inputs reach the bundle its own way: bundles whose datalist globs ``@dataset_dir + '/imagesTs/*.nii.gz'``
    (spleen, btcv, wholebody) get ``--dataset_dir`` with the files linked into ``imagesTs``; prostate gets a
    ``dataset_dir`` (with the trailing slash its expression needs) holding the files and a ``test.csv`` with a
    ``t2`` column; brats gets ``--data_list_file_path`` to a decathlon datalist (``testing``: one item per case,
    ``image`` = its 4 files) and ``--dataset_dir`` as the base of the relative names. Returns one path per case,
    in order: SaveImaged's ``<out_dir>/<stem>/<stem>_<postfix><ext>`` (stem of the case's first file).
    """
    bundle_dir = Path(bundle_dir).resolve()
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    config_file = _config_file(bundle_dir)
    from monai.bundle import ConfigParser

    config = ConfigParser.load_config_file(str(config_file))
    cases = [[Path(f) for f in case] for case in cases]
    stems = [_stem(case[0]) for case in cases]
    if len(set(stems)) != len(stems):
        raise ValueError(f"case names must differ (SaveImaged names outputs by them): {stems}")
    names = [Path(f).name for case in cases for f in case]
    if len(set(names)) != len(names):
        raise ValueError(f"input file names must differ: {names}")

    with tempfile.TemporaryDirectory(prefix="oracle_") as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        args: list[str] = []
        if "data_list_file_path" in config:  # brats: a decathlon datalist
            for case in cases:
                for f in case:
                    _link(f, data / f.name)
            datalist = Path(tmp) / "datalist.json"
            datalist.write_text(json.dumps({"testing": [{"image": [f.name for f in case]} for case in cases]}))
            args += ["--data_list_file_path", str(datalist), "--dataset_dir", str(data)]
        elif "test.csv" in str(config.get("datalist", "")):  # prostate: dataset_dir/test.csv, column t2
            with open(data / "test.csv", "w", newline="") as fh:
                writer = csv.writer(fh)
                writer.writerow(["ID", "t2"])
                for i, case in enumerate(cases):
                    if len(case) != 1:
                        raise ValueError(f"{bundle_dir.name} takes one file per case, not {len(case)}")
                    _link(case[0], data / case[0].name)
                    writer.writerow([i, case[0].name])
            args += ["--dataset_dir", str(data) + os.sep]
        else:  # spleen, btcv, wholebody: glob(@dataset_dir + '/imagesTs/*.nii.gz')
            (data / "imagesTs").mkdir()
            for case in cases:
                if len(case) != 1:
                    raise ValueError(f"{bundle_dir.name} takes one file per case, not {len(case)}")
                if not case[0].name.endswith(".nii.gz"):
                    raise ValueError(f"the bundle's datalist globs *.nii.gz: {case[0]}")
                _link(case[0], data / "imagesTs" / case[0].name)
            args += ["--dataset_dir", str(data)]
        cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(config_file),
               "--bundle_root", str(bundle_dir), "--output_dir", str(out_dir), *args]
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp)
        except subprocess.TimeoutExpired as exc:
            tail = (exc.stderr or b"")[-4000:]
            raise RuntimeError(f"monai.bundle run timed out after {timeout} s: {cmd}\n{tail!r}") from exc
    if proc.returncode != 0:
        raise RuntimeError(f"monai.bundle run failed ({proc.returncode}): {cmd}\n--- stderr tail ---\n"
                           f"{proc.stderr[-4000:]}\n--- stdout tail ---\n{proc.stdout[-2000:]}")
    postfix, ext = _save_naming(config)
    results = []
    for stem in stems:
        path = out_dir / stem / f"{stem}_{postfix}{ext}"
        if not path.is_file():
            found = sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*") if p.is_file())
            raise RuntimeError(f"monai.bundle run wrote no {path}; it wrote {found}\n{proc.stderr[-2000:]}")
        results.append(path)
    return results


def _save_naming(config: dict[str, Any]) -> tuple[str, str]:
    """SaveImaged's output_postfix and output_ext in the config (MONAI's defaults "trans", ".nii.gz")."""
    save = next(t for t in config["postprocessing"]["transforms"] if t.get("_target_") == "SaveImaged")

    def value(key: str, default: str) -> str:
        v = save.get(key, default)
        return str(config[v[1:]]) if isinstance(v, str) and v.startswith("@") else str(v)

    return value("output_postfix", "trans"), value("output_ext", ".nii.gz")


# ------------------------------------------------------------------------ the real zoo configs, verbatim
# Generated from the mirror of Project-MONAI/model-zoo (commit ZOO_COMMIT): json.loads of
# models/<ZOO_NAMES[shape]>/configs/{inference,metadata}.json, printed with pprint (key order kept).

_REAL_INFERENCE: dict[str, dict[str, Any]] = {'spleen': {'imports': ['$import glob', '$import numpy', '$import os'],
            'bundle_root': '.',
            'image_key': 'image',
            'output_dir': "$@bundle_root + '/eval'",
            'output_ext': '.nii.gz',
            'output_dtype': '$numpy.float32',
            'output_postfix': 'trans',
            'separate_folder': True,
            'load_pretrain': True,
            'dataset_dir': '/workspace/data/Task09_Spleen',
            'datalist': "$list(sorted(glob.glob(@dataset_dir + '/imagesTs/*.nii.gz')))",
            'device': "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
            'network_def': {'_target_': 'UNet',
                            'spatial_dims': 3,
                            'in_channels': 1,
                            'out_channels': 2,
                            'channels': [16, 32, 64, 128, 256],
                            'strides': [2, 2, 2, 2],
                            'num_res_units': 2,
                            'norm': 'batch'},
            'network': '$@network_def.to(@device)',
            'preprocessing': {'_target_': 'Compose',
                              'transforms': [{'_target_': 'LoadImaged', 'keys': '@image_key'},
                                             {'_target_': 'EnsureChannelFirstd', 'keys': '@image_key'},
                                             {'_target_': 'Orientationd', 'keys': '@image_key', 'axcodes': 'RAS'},
                                             {'_target_': 'Spacingd',
                                              'keys': '@image_key',
                                              'pixdim': [1.5, 1.5, 2.0],
                                              'mode': 'bilinear'},
                                             {'_target_': 'ScaleIntensityRanged',
                                              'keys': '@image_key',
                                              'a_min': -57,
                                              'a_max': 164,
                                              'b_min': 0,
                                              'b_max': 1,
                                              'clip': True},
                                             {'_target_': 'EnsureTyped', 'keys': '@image_key'}]},
            'dataset': {'_target_': 'Dataset',
                        'data': "$[{'image': i} for i in @datalist]",
                        'transform': '@preprocessing'},
            'dataloader': {'_target_': 'DataLoader',
                           'dataset': '@dataset',
                           'batch_size': 1,
                           'shuffle': False,
                           'num_workers': 4},
            'inferer': {'_target_': 'SlidingWindowInferer',
                        'roi_size': [96, 96, 96],
                        'sw_batch_size': 4,
                        'overlap': 0.5},
            'postprocessing': {'_target_': 'Compose',
                               'transforms': [{'_target_': 'Activationsd', 'keys': 'pred', 'softmax': True},
                                              {'_target_': 'Invertd',
                                               'keys': 'pred',
                                               'transform': '@preprocessing',
                                               'orig_keys': '@image_key',
                                               'nearest_interp': False,
                                               'to_tensor': True},
                                              {'_target_': 'AsDiscreted', 'keys': 'pred', 'argmax': True},
                                              {'_target_': 'SaveImaged',
                                               'keys': 'pred',
                                               'output_dir': '@output_dir',
                                               'output_ext': '@output_ext',
                                               'output_dtype': '@output_dtype',
                                               'output_postfix': '@output_postfix',
                                               'separate_folder': '@separate_folder'}]},
            'handlers': [{'_target_': 'StatsHandler', 'iteration_log': False}],
            'evaluator': {'_target_': 'SupervisedEvaluator',
                          'device': '@device',
                          'val_data_loader': '@dataloader',
                          'network': '@network',
                          'inferer': '@inferer',
                          'postprocessing': '@postprocessing',
                          'val_handlers': '@handlers',
                          'amp': True},
            'checkpointloader': {'_target_': 'CheckpointLoader',
                                 'load_path': "$@bundle_root + '/models/model.pt'",
                                 'load_dict': {'model': '@network'}},
            'initialize': ['$monai.utils.set_determinism(seed=123)',
                           '$@checkpointloader(@evaluator) if @load_pretrain else None'],
            'run': ['$@evaluator.run()']},
 'btcv': {'imports': ['$import glob', '$import numpy', '$import os'],
          'bundle_root': '.',
          'checkpoint': "$@bundle_root + '/models/model.pt'",
          'image_key': 'image',
          'output_dir': "$@bundle_root + '/eval'",
          'output_ext': '.nii.gz',
          'output_dtype': '$numpy.float32',
          'output_postfix': 'trans',
          'separate_folder': True,
          'load_pretrain': True,
          'dataset_dir': '/workspace/data/RawData/',
          'datalist': "$list(sorted(glob.glob(@dataset_dir + '/imagesTs/*.nii.gz')))",
          'device': "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
          'network_def': {'_target_': 'SwinUNETR',
                          'spatial_dims': 3,
                          'img_size': 96,
                          'in_channels': 1,
                          'out_channels': 14,
                          'feature_size': 48,
                          'use_checkpoint': False},
          'network': '$@network_def.to(@device)',
          'preprocessing': {'_target_': 'Compose',
                            'transforms': [{'_target_': 'LoadImaged', 'keys': '@image_key', 'reader': 'ITKReader'},
                                           {'_target_': 'EnsureChannelFirstd', 'keys': '@image_key'},
                                           {'_target_': 'Orientationd', 'keys': '@image_key', 'axcodes': 'RAS'},
                                           {'_target_': 'Spacingd',
                                            'keys': '@image_key',
                                            'pixdim': [1.5, 1.5, 2.0],
                                            'mode': 'bilinear'},
                                           {'_target_': 'ScaleIntensityRanged',
                                            'keys': '@image_key',
                                            'a_min': -175,
                                            'a_max': 250,
                                            'b_min': 0.0,
                                            'b_max': 1.0,
                                            'clip': True},
                                           {'_target_': 'EnsureTyped', 'keys': '@image_key'}]},
          'dataset': {'_target_': 'Dataset',
                      'data': "$[{'image': i} for i in @datalist]",
                      'transform': '@preprocessing'},
          'dataloader': {'_target_': 'DataLoader',
                         'dataset': '@dataset',
                         'batch_size': 1,
                         'shuffle': False,
                         'num_workers': 4},
          'inferer': {'_target_': 'SlidingWindowInferer',
                      'roi_size': [96, 96, 96],
                      'sw_batch_size': 4,
                      'overlap': 0.5},
          'postprocessing': {'_target_': 'Compose',
                             'transforms': [{'_target_': 'Activationsd', 'keys': 'pred', 'softmax': True},
                                            {'_target_': 'Invertd',
                                             'keys': 'pred',
                                             'transform': '@preprocessing',
                                             'orig_keys': '@image_key',
                                             'nearest_interp': False,
                                             'to_tensor': True},
                                            {'_target_': 'AsDiscreted', 'keys': 'pred', 'argmax': True},
                                            {'_target_': 'SaveImaged',
                                             'keys': 'pred',
                                             'output_dir': '@output_dir',
                                             'output_ext': '@output_ext',
                                             'output_dtype': '@output_dtype',
                                             'output_postfix': '@output_postfix',
                                             'separate_folder': '@separate_folder'}]},
          'handlers': [{'_target_': 'StatsHandler', 'iteration_log': False}],
          'evaluator': {'_target_': 'SupervisedEvaluator',
                        'device': '@device',
                        'val_data_loader': '@dataloader',
                        'network': '@network',
                        'inferer': '@inferer',
                        'postprocessing': '@postprocessing',
                        'val_handlers': '@handlers',
                        'amp': True},
          'checkpointloader': {'_target_': 'CheckpointLoader',
                               'load_path': '$@checkpoint',
                               'load_dict': {'model': '@network'}},
          'initialize': ['$monai.utils.set_determinism(seed=123)',
                         '$@checkpointloader(@evaluator) if @load_pretrain else None'],
          'run': ['$@evaluator.run()']},
 'brats': {'imports': ['$import glob', '$import numpy', '$import os'],
           'bundle_root': '.',
           'image_key': 'image',
           'ckpt_dir': "$@bundle_root + '/models'",
           'output_dir': "$@bundle_root + '/eval'",
           'output_ext': '.nii.gz',
           'output_dtype': 'uint8',
           'output_postfix': 'seg',
           'separate_folder': True,
           'load_pretrain': True,
           'data_list_file_path': "$@bundle_root + '/configs/datalist.json'",
           'dataset_dir': '/workspace/data/medical/brats2018challenge',
           'test_datalist': "$monai.data.load_decathlon_datalist(@data_list_file_path, data_list_key='testing', "
                            'base_dir=@dataset_dir)',
           'device': "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
           'amp': True,
           'network_def': {'_target_': 'SegResNet',
                           'blocks_down': [1, 2, 2, 4],
                           'blocks_up': [1, 1, 1],
                           'init_filters': 16,
                           'in_channels': 4,
                           'out_channels': 3,
                           'dropout_prob': 0.2},
           'network': '$@network_def.to(@device)',
           'preprocessing': {'_target_': 'Compose',
                             'transforms': [{'_target_': 'LoadImaged', 'keys': '@image_key', 'image_only': False},
                                            {'_target_': 'NormalizeIntensityd',
                                             'keys': '@image_key',
                                             'nonzero': True,
                                             'channel_wise': True}]},
           'dataset': {'_target_': 'Dataset', 'data': '@test_datalist', 'transform': '@preprocessing'},
           'dataloader': {'_target_': 'DataLoader',
                          'dataset': '@dataset',
                          'batch_size': 1,
                          'shuffle': True,
                          'num_workers': 4},
           'inferer': {'_target_': 'SlidingWindowInferer',
                       'roi_size': [240, 240, 160],
                       'sw_batch_size': 1,
                       'overlap': 0.5},
           'postprocessing': {'_target_': 'Compose',
                              'transforms': [{'_target_': 'Activationsd', 'keys': 'pred', 'sigmoid': True},
                                             {'_target_': 'Invertd',
                                              'keys': 'pred',
                                              'transform': '@preprocessing',
                                              'orig_keys': '@image_key',
                                              'meta_keys': 'pred_meta_dict',
                                              'nearest_interp': False,
                                              'to_tensor': True},
                                             {'_target_': 'AsDiscreted', 'keys': 'pred', 'threshold': 0.5},
                                             {'_target_': 'Lambdad',
                                              'keys': 'pred',
                                              'func': '$lambda x: torch.where(x[[2]] > 0, 4, torch.where(x[[0]] > 0, '
                                                      '1, torch.where(x[[1]] > 0, 2, 0)))'},
                                             {'_target_': 'SaveImaged',
                                              'keys': 'pred',
                                              'meta_keys': 'pred_meta_dict',
                                              'output_dir': '@output_dir',
                                              'output_ext': '@output_ext',
                                              'output_dtype': '@output_dtype',
                                              'output_postfix': '@output_postfix',
                                              'separate_folder': '@separate_folder',
                                              'resample': False,
                                              'squeeze_end_dims': True}]},
           'handlers': [{'_target_': 'StatsHandler', 'iteration_log': False}],
           'evaluator': {'_target_': 'SupervisedEvaluator',
                         'device': '@device',
                         'val_data_loader': '@dataloader',
                         'network': '@network',
                         'inferer': '@inferer',
                         'postprocessing': '@postprocessing',
                         'val_handlers': '@handlers',
                         'amp': True},
           'checkpointloader': {'_target_': 'CheckpointLoader',
                                'load_path': "$@bundle_root + '/models/model.pt'",
                                'load_dict': {'model': '@network'}},
           'initialize': ["$setattr(torch.backends.cudnn, 'benchmark', True)",
                          '$@checkpointloader(@evaluator) if @load_pretrain else None'],
           'run': ['$@evaluator.run()']},
 'wholebody': {'displayable_configs': {'highres': True, 'sw_overlap': 0.25, 'sw_batch_size': 1},
               'imports': ['$import glob', '$import numpy', '$import os'],
               'bundle_root': '.',
               'image_key': 'image',
               'output_dir': "$@bundle_root + '/eval'",
               'output_ext': '.nii.gz',
               'output_dtype': '$numpy.float32',
               'output_postfix': 'trans',
               'separate_folder': True,
               'load_pretrain': True,
               'dataset_dir': 'sampledata',
               'datalist': "$list(sorted(glob.glob(@dataset_dir + '/imagesTs/*.nii.gz')))",
               'device': "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
               'pixdim': '$[1.5, 1.5, 1.5] if @displayable_configs#highres else [3.0, 3.0, 3.0]',
               'modelname': "$'model.pt' if @displayable_configs#highres else 'model_lowres.pt'",
               'network_def': {'_target_': 'SegResNet',
                               'spatial_dims': 3,
                               'in_channels': 1,
                               'out_channels': 105,
                               'init_filters': 32,
                               'blocks_down': [1, 2, 2, 4],
                               'blocks_up': [1, 1, 1],
                               'dropout_prob': 0.2},
               'network': '$@network_def.to(@device)',
               'preprocessing': {'_target_': 'Compose',
                                 'transforms': [{'_target_': 'LoadImaged', 'keys': '@image_key'},
                                                {'_target_': 'EnsureTyped', 'keys': '@image_key'},
                                                {'_target_': 'EnsureChannelFirstd', 'keys': '@image_key'},
                                                {'_target_': 'Orientationd', 'keys': '@image_key', 'axcodes': 'RAS'},
                                                {'_target_': 'Spacingd',
                                                 'keys': '@image_key',
                                                 'pixdim': '@pixdim',
                                                 'mode': 'bilinear'},
                                                {'_target_': 'NormalizeIntensityd',
                                                 'keys': '@image_key',
                                                 'nonzero': True},
                                                {'_target_': 'ScaleIntensityd',
                                                 'keys': '@image_key',
                                                 'minv': -1.0,
                                                 'maxv': 1.0}]},
               'dataset': {'_target_': 'Dataset',
                           'data': "$[{'image': i} for i in @datalist]",
                           'transform': '@preprocessing'},
               'dataloader': {'_target_': 'DataLoader',
                              'dataset': '@dataset',
                              'batch_size': 1,
                              'shuffle': False,
                              'num_workers': 1},
               'inferer': {'_target_': 'SlidingWindowInferer',
                           'roi_size': [96, 96, 96],
                           'sw_batch_size': '@displayable_configs#sw_batch_size',
                           'overlap': '@displayable_configs#sw_overlap',
                           'padding_mode': 'replicate',
                           'mode': 'gaussian',
                           'device': "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')"},
               'postprocessing': {'_target_': 'Compose',
                                  'transforms': [{'_target_': 'Activationsd', 'keys': 'pred', 'softmax': True},
                                                 {'_target_': 'AsDiscreted', 'keys': 'pred', 'argmax': True},
                                                 {'_target_': 'Invertd',
                                                  'keys': 'pred',
                                                  'transform': '@preprocessing',
                                                  'orig_keys': '@image_key',
                                                  'nearest_interp': True,
                                                  'to_tensor': True},
                                                 {'_target_': 'SaveImaged',
                                                  'keys': 'pred',
                                                  'output_dir': '@output_dir',
                                                  'output_ext': '@output_ext',
                                                  'output_dtype': '@output_dtype',
                                                  'output_postfix': '@output_postfix',
                                                  'separate_folder': '@separate_folder'}]},
               'handlers': [{'_target_': 'StatsHandler', 'iteration_log': False}],
               'evaluator': {'_target_': 'SupervisedEvaluator',
                             'device': '@device',
                             'val_data_loader': '@dataloader',
                             'network': '@network',
                             'inferer': '@inferer',
                             'postprocessing': '@postprocessing',
                             'val_handlers': '@handlers',
                             'amp': True},
               'checkpointloader': {'_target_': 'CheckpointLoader',
                                    'load_path': "$@bundle_root + '/models/' + @modelname",
                                    'load_dict': {'model': '@network'}},
               'initialize': ["$setattr(torch.backends.cudnn, 'benchmark', True)",
                              '$@checkpointloader(@evaluator) if @load_pretrain else None'],
               'run': ['$@evaluator.run()']},
 'prostate': {'imports': ['$import pandas as pd', '$import os'],
              'bundle_root': '.',
              'output_dir': "$@bundle_root + '/eval'",
              'dataset_dir': '/workspace/data/prostate158/prostate158_test/',
              'datalist': "$list(@dataset_dir + pd.read_csv(@dataset_dir + 'test.csv').t2)",
              'device': "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
              'network_def': {'_target_': 'UNet',
                              'spatial_dims': 3,
                              'in_channels': 1,
                              'out_channels': 3,
                              'channels': [16, 32, 64, 128, 256, 512],
                              'strides': [2, 2, 2, 2, 2],
                              'num_res_units': 4,
                              'norm': 'batch',
                              'act': 'prelu',
                              'dropout': 0.15},
              'network': '$@network_def.to(@device)',
              'preprocessing': {'_target_': 'Compose',
                                'transforms': [{'_target_': 'LoadImaged', 'keys': 'image'},
                                               {'_target_': 'EnsureChannelFirstd', 'keys': 'image'},
                                               {'_target_': 'Orientationd', 'keys': 'image', 'axcodes': 'RAS'},
                                               {'_target_': 'Spacingd',
                                                'keys': 'image',
                                                'pixdim': [0.5, 0.5, 0.5],
                                                'mode': 'bilinear'},
                                               {'_target_': 'ScaleIntensityd', 'keys': 'image', 'minv': 0, 'maxv': 1},
                                               {'_target_': 'NormalizeIntensityd', 'keys': 'image'},
                                               {'_target_': 'EnsureTyped', 'keys': 'image'}]},
              'dataset': {'_target_': 'Dataset',
                          'data': "$[{'image': i} for i in @datalist]",
                          'transform': '@preprocessing'},
              'dataloader': {'_target_': 'DataLoader',
                             'dataset': '@dataset',
                             'batch_size': 1,
                             'shuffle': False,
                             'num_workers': 4},
              'inferer': {'_target_': 'SlidingWindowInferer',
                          'roi_size': [96, 96, 96],
                          'sw_batch_size': 4,
                          'overlap': 0.5},
              'postprocessing': {'_target_': 'Compose',
                                 'transforms': [{'_target_': 'AsDiscreted', 'keys': 'pred', 'argmax': True},
                                                {'_target_': 'KeepLargestConnectedComponentd',
                                                 'keys': 'pred',
                                                 'applied_labels': [1, 2]},
                                                {'_target_': 'Invertd',
                                                 'keys': 'pred',
                                                 'transform': '@preprocessing',
                                                 'orig_keys': 'image',
                                                 'meta_key_postfix': 'meta_dict',
                                                 'nearest_interp': False,
                                                 'to_tensor': True},
                                                {'_target_': 'SaveImaged',
                                                 'keys': 'pred',
                                                 'resample': False,
                                                 'meta_keys': 'pred_meta_dict',
                                                 'output_dir': '@output_dir'}]},
              'handlers': [{'_target_': 'CheckpointLoader',
                            'load_path': "$@bundle_root + '/models/model.pt'",
                            'map_location': {'_target_': 'torch.device', 'device': '@device'},
                            'load_dict': {'model': '@network'}},
                           {'_target_': 'StatsHandler', 'iteration_log': False}],
              'evaluator': {'_target_': 'SupervisedEvaluator',
                            'device': '@device',
                            'val_data_loader': '@dataloader',
                            'network': '@network',
                            'inferer': '@inferer',
                            'postprocessing': '@postprocessing',
                            'val_handlers': '@handlers',
                            'amp': True},
              'initialize': ["$setattr(torch.backends.cudnn, 'benchmark', True)"],
              'run': ['$@evaluator.run()']}}

_REAL_METADATA: dict[str, dict[str, Any]] = {'spleen': {'schema': 'https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json',
            'version': '0.5.9',
            'changelog': {'0.5.9': 'use monai 1.4 and update large files',
                          '0.5.8': 'update to use monai 1.3.2',
                          '0.5.7': 'update to use monai 1.3.1',
                          '0.5.6': 'add load_pretrain flag for infer',
                          '0.5.5': 'add checkpoint loader for infer',
                          '0.5.4': 'update to use monai 1.3.0',
                          '0.5.3': 'fix the wrong GPU index issue of multi-node',
                          '0.5.2': 'remove error dollar symbol in readme',
                          '0.5.1': 'add RAM warning',
                          '0.5.0': 'update the README file with the ONNX-TensorRT conversion',
                          '0.4.9': 'update TensorRT descriptions',
                          '0.4.8': 'update deterministic training results',
                          '0.4.7': 'update the TensorRT part in the README file',
                          '0.4.6': 'fix mgpu finalize issue',
                          '0.4.5': 'enable deterministic training',
                          '0.4.4': 'add the command of executing inference with TensorRT models',
                          '0.4.3': 'fix figure and weights inconsistent error',
                          '0.4.2': 'use torch 1.13.1',
                          '0.4.1': 'update the readme file with TensorRT convert',
                          '0.4.0': 'fix multi-gpu train config typo',
                          '0.3.9': 'adapt to BundleWorkflow interface',
                          '0.3.8': 'add name tag',
                          '0.3.7': 'restructure readme to match updated template',
                          '0.3.6': 'enhance readme with details of model training',
                          '0.3.5': 'update to use monai 1.0.1',
                          '0.3.4': 'enhance readme on commands example',
                          '0.3.3': 'fix license Copyright error',
                          '0.3.2': 'improve multi-gpu logging',
                          '0.3.1': 'add multi-gpu evaluation config',
                          '0.3.0': 'update license files',
                          '0.2.0': 'unify naming',
                          '0.1.1': 'disable image saving during evaluation',
                          '0.1.0': 'complete the model package',
                          '0.0.1': 'initialize the model package structure'},
            'monai_version': '1.4.0',
            'pytorch_version': '2.4.0',
            'numpy_version': '1.24.4',
            'optional_packages_version': {'nibabel': '5.2.1', 'pytorch-ignite': '0.4.11'},
            'name': 'Spleen CT segmentation',
            'task': 'Decathlon spleen segmentation',
            'description': 'A pre-trained model for volumetric (3D) segmentation of the spleen from CT image',
            'authors': 'MONAI team',
            'copyright': 'Copyright (c) MONAI Consortium',
            'data_source': 'Task09_Spleen.tar from http://medicaldecathlon.com/',
            'data_type': 'nibabel',
            'image_classes': 'single channel data, intensity scaled to [0, 1]',
            'label_classes': 'single channel data, 1 is spleen, 0 is everything else',
            'pred_classes': '2 channels OneHot data, channel 1 is spleen, channel 0 is background',
            'eval_metrics': {'mean_dice': 0.961},
            'intended_use': 'This is an example, not to be used for diagnostic purposes',
            'references': ["Xia, Yingda, et al. '3D Semi-Supervised Learning with Uncertainty-Aware Multi-View "
                           'Co-Training. arXiv preprint arXiv:1811.12506 (2018). https://arxiv.org/abs/1811.12506.',
                           'Kerfoot E., Clough J., Oksuz I., Lee J., King A.P., Schnabel J.A. (2019) Left-Ventricle '
                           'Quantification Using Residual U-Net. In: Pop M. et al. (eds) Statistical Atlases and '
                           'Computational Models of the Heart. Atrial Segmentation and LV Quantification Challenges. '
                           'STACOM 2018. Lecture Notes in Computer Science, vol 11395. Springer, Cham. '
                           'https://doi.org/10.1007/978-3-030-12029-0_40'],
            'network_data_format': {'inputs': {'image': {'type': 'image',
                                                         'format': 'hounsfield',
                                                         'modality': 'CT',
                                                         'num_channels': 1,
                                                         'spatial_shape': [96, 96, 96],
                                                         'dtype': 'float32',
                                                         'value_range': [0, 1],
                                                         'is_patch_data': True,
                                                         'channel_def': {'0': 'image'}}},
                                    'outputs': {'pred': {'type': 'image',
                                                         'format': 'segmentation',
                                                         'num_channels': 2,
                                                         'spatial_shape': [96, 96, 96],
                                                         'dtype': 'float32',
                                                         'value_range': [0, 1],
                                                         'is_patch_data': True,
                                                         'channel_def': {'0': 'background', '1': 'spleen'}}}}},
 'btcv': {'schema': 'https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json',
          'version': '0.5.6',
          'changelog': {'0.5.6': 'update tensorrt benchmark results',
                        '0.5.5': 'enable tensorrt',
                        '0.5.4': 'update to use monai 1.3.1',
                        '0.5.3': 'add load_pretrain flag for infer',
                        '0.5.2': 'add checkpoint loader for infer',
                        '0.5.1': 'remove meta_dict usage',
                        '0.5.0': 'fix the wrong GPU index issue of multi-node',
                        '0.4.9': 'remove error dollar symbol in readme',
                        '0.4.8': 'add RAM usage with CacheDataset',
                        '0.4.7': 'deterministic retrain benchmark',
                        '0.4.6': 'fix mgpu finalize issue',
                        '0.4.5': 'enable deterministic training',
                        '0.4.4': 'update numbers',
                        '0.4.3': 'adapt to BundleWorkflow interface',
                        '0.4.2': 'fix train params of use_checkpoint',
                        '0.4.1': 'update params to supprot torch.jit.trace torchscript conversion',
                        '0.4.0': 'add name tag',
                        '0.3.9': 'use ITKreader to avoid mass logs at image loading',
                        '0.3.8': 'restructure readme to match updated template',
                        '0.3.7': 'Update metric in metadata',
                        '0.3.6': 'Update ckpt drive link',
                        '0.3.5': 'Update figure and benchmarking',
                        '0.3.4': 'Update figure link in readme',
                        '0.3.3': 'Update, verify MONAI 1.0.1 and Pytorch 1.13.0',
                        '0.3.2': 'enhance readme on commands example',
                        '0.3.1': 'fix license Copyright error',
                        '0.3.0': 'update license files',
                        '0.2.0': 'unify naming',
                        '0.1.0': 'complete the model package',
                        '0.0.1': 'initialize the model package structure'},
          'monai_version': '1.4.0',
          'pytorch_version': '2.4.0',
          'numpy_version': '1.24.4',
          'optional_packages_version': {'nibabel': '5.2.1', 'pytorch-ignite': '0.4.11', 'einops': '0.7.0'},
          'name': 'Swin UNETR BTCV segmentation',
          'task': 'BTCV multi-organ segmentation',
          'description': 'A pre-trained model for volumetric (3D) multi-organ segmentation from CT image',
          'authors': 'MONAI team',
          'copyright': 'Copyright (c) MONAI Consortium',
          'data_source': 'RawData.zip from https://www.synapse.org/#!Synapse:syn3193805/wiki/217752/',
          'data_type': 'nibabel',
          'image_classes': 'single channel data, intensity scaled to [0, 1]',
          'label_classes': 'multi-channel data,0:background,1:spleen, 2:Right Kidney, 3:Left Kideny, 4:Gallbladder, '
                           '5:Esophagus, 6:Liver, 7:Stomach, 8:Aorta, 9:IVC, 10:Portal and Splenic Veins, '
                           '11:Pancreas, 12:Right adrenal gland, 13:Left adrenal gland',
          'pred_classes': '14 channels OneHot data, 0:background,1:spleen, 2:Right Kidney, 3:Left Kideny, '
                          '4:Gallbladder, 5:Esophagus, 6:Liver, 7:Stomach, 8:Aorta, 9:IVC, 10:Portal and Splenic '
                          'Veins, 11:Pancreas, 12:Right adrenal gland, 13:Left adrenal gland',
          'eval_metrics': {'mean_dice': 0.82},
          'intended_use': 'This is an example, not to be used for diagnostic purposes',
          'references': ["Hatamizadeh, Ali, et al. 'Swin UNETR: Swin Transformers for Semantic Segmentation of Brain "
                         'Tumors in MRI Images. arXiv preprint arXiv:2201.01266 (2022). '
                         'https://arxiv.org/abs/2201.01266.',
                         "Tang, Yucheng, et al. 'Self-supervised pre-training of swin transformers for 3d medical "
                         'image analysis. arXiv preprint arXiv:2111.14791 (2021). https://arxiv.org/abs/2111.14791.'],
          'network_data_format': {'inputs': {'image': {'type': 'image',
                                                       'format': 'hounsfield',
                                                       'modality': 'CT',
                                                       'num_channels': 1,
                                                       'spatial_shape': [96, 96, 96],
                                                       'dtype': 'float32',
                                                       'value_range': [0, 1],
                                                       'is_patch_data': True,
                                                       'channel_def': {'0': 'image'}}},
                                  'outputs': {'pred': {'type': 'image',
                                                       'format': 'segmentation',
                                                       'num_channels': 14,
                                                       'spatial_shape': [96, 96, 96],
                                                       'dtype': 'float32',
                                                       'value_range': [0, 1],
                                                       'is_patch_data': True,
                                                       'channel_def': {'0': 'background',
                                                                       '1': 'spleen',
                                                                       '2': 'Right Kidney',
                                                                       '3': 'Left Kideny',
                                                                       '4': 'Gallbladder',
                                                                       '5': 'Esophagus',
                                                                       '6': 'Liver',
                                                                       '7': 'Stomach',
                                                                       '8': 'Aorta',
                                                                       '9': 'IVC',
                                                                       '10': 'Portal and Splenic Veins',
                                                                       '11': 'Pancreas',
                                                                       '12': 'Right adrenal gland',
                                                                       '13': 'Left adrenal gland'}}}}},
 'brats': {'schema': 'https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json',
           'version': '0.5.2',
           'changelog': {'0.5.2': 'use monai 1.4 and update large files',
                         '0.5.1': 'update to use monai 1.3.1',
                         '0.5.0': 'add load_pretrain flag for infer',
                         '0.4.9': 'add checkpoint loader for infer',
                         '0.4.8': 'fix the wrong GPU index issue of multi-node',
                         '0.4.7': 'enhance prepare datalist file',
                         '0.4.6': 'add dataset dir example',
                         '0.4.5': 'update ONNX-TensorRT descriptions',
                         '0.4.4': 'update error links',
                         '0.4.3': 'add the ONNX-TensorRT way of model conversion',
                         '0.4.2': 'fix mgpu finalize issue',
                         '0.4.1': 'add non-deterministic note',
                         '0.4.0': 'adapt to BundleWorkflow interface',
                         '0.3.9': 'black autofix format and add name tag',
                         '0.3.8': 'modify dataset key name',
                         '0.3.7': 'restructure readme to match updated template',
                         '0.3.6': 'added train/val graphs',
                         '0.3.5': 'update prepare datalist function',
                         '0.3.4': 'update output format of inference',
                         '0.3.3': 'update to use monai 1.0.1',
                         '0.3.2': 'enhance readme on commands example',
                         '0.3.1': 'fix license Copyright error',
                         '0.3.0': 'update license files',
                         '0.2.1': 'fix network_data_format error',
                         '0.2.0': 'unify naming',
                         '0.1.1': 'update for MetaTensor',
                         '0.1.0': 'complete the model package'},
           'monai_version': '1.4.0',
           'pytorch_version': '2.4.0',
           'numpy_version': '1.24.4',
           'optional_packages_version': {'nibabel': '5.2.1',
                                         'pytorch-ignite': '0.4.11',
                                         'scikit-learn': '1.5.1',
                                         'tensorboard': '2.17.0'},
           'name': 'BraTS MRI segmentation',
           'task': 'Multimodal Brain Tumor segmentation',
           'description': 'A pre-trained model for volumetric (3D) segmentation of brain tumor subregions from '
                          'multimodal MRIs based on BraTS 2018 data',
           'authors': 'MONAI team',
           'copyright': 'Copyright (c) MONAI Consortium',
           'data_source': 'https://www.med.upenn.edu/sbia/brats2018/data.html',
           'data_type': 'nibabel',
           'image_classes': '4 channel data, T1c, T1, T2, FLAIR at 1x1x1 mm',
           'label_classes': '3 channel data, channel 0 for Tumor core, channel 1 for Whole tumor, channel 2 for '
                            'Enhancing tumor',
           'pred_classes': '3 channels data, same as label_classes',
           'eval_metrics': {'val_mean_dice': 0.8518,
                            'val_mean_dice_tc': 0.8559,
                            'val_mean_dice_wt': 0.9026,
                            'val_mean_dice_et': 0.7905},
           'intended_use': 'This is an example, not to be used for diagnostic purposes',
           'references': ["Myronenko, Andriy. '3D MRI brain tumor segmentation using autoencoder regularization.' "
                          'International MICCAI Brainlesion Workshop. Springer, Cham, 2018. '
                          'https://arxiv.org/abs/1810.11654'],
           'network_data_format': {'inputs': {'image': {'type': 'image',
                                                        'format': 'magnitude',
                                                        'modality': 'MR',
                                                        'num_channels': 4,
                                                        'spatial_shape': ['8*n', '8*n', '8*n'],
                                                        'dtype': 'float32',
                                                        'value_range': [],
                                                        'is_patch_data': True,
                                                        'channel_def': {'0': 'T1c',
                                                                        '1': 'T1',
                                                                        '2': 'T2',
                                                                        '3': 'FLAIR'}}},
                                   'outputs': {'pred': {'type': 'image',
                                                        'format': 'segmentation',
                                                        'num_channels': 3,
                                                        'spatial_shape': ['8*n', '8*n', '8*n'],
                                                        'dtype': 'float32',
                                                        'value_range': [0, 1],
                                                        'is_patch_data': True,
                                                        'channel_def': {'0': 'Tumor core',
                                                                        '1': 'Whole tumor',
                                                                        '2': 'Enhancing tumor'}}}}},
 'wholebody': {'schema': 'https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json',
               'version': '0.2.5',
               'changelog': {'0.2.5': 'use monai 1.4 and update large files',
                             '0.2.4': 'update to use monai 1.3.1',
                             '0.2.3': 'add load_pretrain flag for infer',
                             '0.2.2': 'add checkpoint loader for infer',
                             '0.2.1': 'remove meta_dict usage',
                             '0.2.0': 'add support for TensorRT conversion and inference',
                             '0.1.9': 'fix the wrong GPU index issue of multi-node',
                             '0.1.8': 'Update evalaute doc, GPU usage details, and dataset preparation instructions',
                             '0.1.7': 'remove error dollar symbol in readme',
                             '0.1.6': 'add RAM usage with CacheDataset and GPU consumtion warning',
                             '0.1.5': 'fix mgpu finalize issue',
                             '0.1.4': 'Update README Formatting',
                             '0.1.3': 'add non-deterministic note',
                             '0.1.2': 'Update figure with links',
                             '0.1.1': 'adapt to BundleWorkflow interface and val metric',
                             '0.1.0': 'complete the model package',
                             '0.0.1': 'initialize the model package structure'},
               'monai_version': '1.4.0',
               'pytorch_version': '2.4.0',
               'numpy_version': '1.24.4',
               'optional_packages_version': {'nibabel': '5.2.1', 'pytorch-ignite': '0.4.11'},
               'name': 'Whole body CT segmentation',
               'task': 'TotalSegmentator Segmentation',
               'description': 'A pre-trained SegResNet model for volumetric (3D) segmentation of the 104 whole body '
                              'segments',
               'authors': 'MONAI team',
               'copyright': 'Copyright (c) MONAI Consortium',
               'data_source': 'TotalSegmentator',
               'data_type': 'nibabel',
               'image_classes': '104 foreground channels, 0 channel for the background, intensity scaled to [0, 1]',
               'label_classes': '0 is the background, others are whole body segments',
               'pred_classes': '0 is the background, 104 other chanels are whole body segments',
               'eval_metrics': {'mean_dice': 0.8},
               'intended_use': 'This is an example, not to be used for diagnostic purposes',
               'references': ['Wasserthal, J., Meyer, M., Breit, H.C., Cyriac, J., Yang, S. and Segeroth, M., 2022. '
                              'TotalSegmentator: robust segmentation of 104 anatomical structures in CT images. '
                              'arXiv preprint arXiv:2208.05868.',
                              'Myronenko, A., Siddiquee, M.M.R., Yang, D., He, Y. and Xu, D., 2022. Automated head '
                              'and neck tumor segmentation from 3D PET/CT. arXiv preprint arXiv:2209.10809.',
                              'Tang, Y., Gao, R., Lee, H.H., Han, S., Chen, Y., Gao, D., Nath, V., Bermudez, C., '
                              'Savona, M.R., Abramson, R.G. and Bao, S., 2021. High-resolution 3D abdominal '
                              'segmentation with random patch network fusion. Medical image analysis, 69, p.101894.'],
               'network_data_format': {'inputs': {'image': {'type': 'image',
                                                            'format': 'hounsfield',
                                                            'modality': 'CT',
                                                            'num_channels': 1,
                                                            'spatial_shape': [96, 96, 96],
                                                            'dtype': 'float32',
                                                            'value_range': [0, 1],
                                                            'is_patch_data': True,
                                                            'channel_def': {'0': 'image'}}},
                                       'outputs': {'pred': {'type': 'image',
                                                            'format': 'segmentation',
                                                            'num_channels': 105,
                                                            'spatial_shape': [96, 96, 96],
                                                            'dtype': 'float32',
                                                            'value_range': [0, 104],
                                                            'is_patch_data': True,
                                                            'channel_def': {'0': 'background',
                                                                            '1': 'spleen',
                                                                            '2': 'kidney_right',
                                                                            '3': 'kidney_left',
                                                                            '4': 'gallbladder',
                                                                            '5': 'liver',
                                                                            '6': 'stomach',
                                                                            '7': 'aorta',
                                                                            '8': 'inferior_vena_cava',
                                                                            '9': 'portal_vein_and_splenic_vein',
                                                                            '10': 'pancreas',
                                                                            '11': 'adrenal_gland_right',
                                                                            '12': 'adrenal_gland_left',
                                                                            '13': 'lung_upper_lobe_left',
                                                                            '14': 'lung_lower_lobe_left',
                                                                            '15': 'lung_upper_lobe_right',
                                                                            '16': 'lung_middle_lobe_right',
                                                                            '17': 'lung_lower_lobe_right',
                                                                            '18': 'vertebrae_L5',
                                                                            '19': 'vertebrae_L4',
                                                                            '20': 'vertebrae_L3',
                                                                            '21': 'vertebrae_L2',
                                                                            '22': 'vertebrae_L1',
                                                                            '23': 'vertebrae_T12',
                                                                            '24': 'vertebrae_T11',
                                                                            '25': 'vertebrae_T10',
                                                                            '26': 'vertebrae_T9',
                                                                            '27': 'vertebrae_T8',
                                                                            '28': 'vertebrae_T7',
                                                                            '29': 'vertebrae_T6',
                                                                            '30': 'vertebrae_T5',
                                                                            '31': 'vertebrae_T4',
                                                                            '32': 'vertebrae_T3',
                                                                            '33': 'vertebrae_T2',
                                                                            '34': 'vertebrae_T1',
                                                                            '35': 'vertebrae_C7',
                                                                            '36': 'vertebrae_C6',
                                                                            '37': 'vertebrae_C5',
                                                                            '38': 'vertebrae_C4',
                                                                            '39': 'vertebrae_C3',
                                                                            '40': 'vertebrae_C2',
                                                                            '41': 'vertebrae_C1',
                                                                            '42': 'esophagus',
                                                                            '43': 'trachea',
                                                                            '44': 'heart_myocardium',
                                                                            '45': 'heart_atrium_left',
                                                                            '46': 'heart_ventricle_left',
                                                                            '47': 'heart_atrium_right',
                                                                            '48': 'heart_ventricle_right',
                                                                            '49': 'pulmonary_artery',
                                                                            '50': 'brain',
                                                                            '51': 'iliac_artery_left',
                                                                            '52': 'iliac_artery_right',
                                                                            '53': 'iliac_vena_left',
                                                                            '54': 'iliac_vena_right',
                                                                            '55': 'small_bowel',
                                                                            '56': 'duodenum',
                                                                            '57': 'colon',
                                                                            '58': 'rib_left_1',
                                                                            '59': 'rib_left_2',
                                                                            '60': 'rib_left_3',
                                                                            '61': 'rib_left_4',
                                                                            '62': 'rib_left_5',
                                                                            '63': 'rib_left_6',
                                                                            '64': 'rib_left_7',
                                                                            '65': 'rib_left_8',
                                                                            '66': 'rib_left_9',
                                                                            '67': 'rib_left_10',
                                                                            '68': 'rib_left_11',
                                                                            '69': 'rib_left_12',
                                                                            '70': 'rib_right_1',
                                                                            '71': 'rib_right_2',
                                                                            '72': 'rib_right_3',
                                                                            '73': 'rib_right_4',
                                                                            '74': 'rib_right_5',
                                                                            '75': 'rib_right_6',
                                                                            '76': 'rib_right_7',
                                                                            '77': 'rib_right_8',
                                                                            '78': 'rib_right_9',
                                                                            '79': 'rib_right_10',
                                                                            '80': 'rib_right_11',
                                                                            '81': 'rib_right_12',
                                                                            '82': 'humerus_left',
                                                                            '83': 'humerus_right',
                                                                            '84': 'scapula_left',
                                                                            '85': 'scapula_right',
                                                                            '86': 'clavicula_left',
                                                                            '87': 'clavicula_right',
                                                                            '88': 'femur_left',
                                                                            '89': 'femur_right',
                                                                            '90': 'hip_left',
                                                                            '91': 'hip_right',
                                                                            '92': 'sacrum',
                                                                            '93': 'face',
                                                                            '94': 'gluteus_maximus_left',
                                                                            '95': 'gluteus_maximus_right',
                                                                            '96': 'gluteus_medius_left',
                                                                            '97': 'gluteus_medius_right',
                                                                            '98': 'gluteus_minimus_left',
                                                                            '99': 'gluteus_minimus_right',
                                                                            '100': 'autochthon_left',
                                                                            '101': 'autochthon_right',
                                                                            '102': 'iliopsoas_left',
                                                                            '103': 'iliopsoas_right',
                                                                            '104': 'urinary_bladder'}}}}},
 'prostate': {'schema': 'https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json',
              'version': '0.3.4',
              'changelog': {'0.3.4': 'support monai 1.4',
                            '0.3.3': 'add invertd transformation',
                            '0.3.2': 'add name tag',
                            '0.3.1': 'fix license Copyright error',
                            '0.3.0': 'update license files',
                            '0.2.0': 'unify naming',
                            '0.1.1': 'add torchscript model',
                            '0.1.0': 'complete the model package'},
              'monai_version': '1.4.0',
              'pytorch_version': '2.4.0',
              'numpy_version': '1.24.4',
              'optional_packages_version': {'nibabel': '5.2.1',
                                            'itk': '5.4.0',
                                            'pytorch-ignite': '0.4.11',
                                            'pandas': '2.2.1'},
              'name': 'Prostate MRI anatomy',
              'task': 'Segmentation of peripheral zone and central gland in prostate MRI',
              'description': 'A pre-trained model for volumetric (3D) segmentation of the prostate from MRI images',
              'authors': 'Keno Bressem',
              'copyright': 'Copyright (c) Keno Bressem',
              'data_source': 'Prostate158 from 10.5281/zenodo.6481141',
              'data_type': 'nifti',
              'image_classes': 'single channel data, intensity scaled to [0, 1]',
              'label_classes': 'singe channel data, 1 central gland, 2 periheral zone, 0 is everything else',
              'pred_classes': '3 channels OneHot data, channel 1 central gland, channel 2 is peripheral zone, '
                              'channel 0 is background',
              'eval_metrics': {'mean_dice': {'central gland': 0.88, 'peripheral zone': 0.75}},
              'intended_use': 'This is an example, not to be used for diagnostic purposes',
              'references': ['Adams, L. C., Makowski, M. R., Engel, G., Rattunde, M., Busch, F., Asbach, P., ... & '
                             'Bressem, K. K. (2022). Prostate158-An expert-annotated 3T MRI dataset and algorithm '
                             'for prostate cancer detection. Computers in Biology and Medicine, 148, 105817.'],
              'network_data_format': {'inputs': {'image': {'type': 'image',
                                                           'format': 'magnitude',
                                                           'modality': 'MR',
                                                           'num_channels': 1,
                                                           'spatial_shape': [96, 96, 96],
                                                           'dtype': 'float32',
                                                           'value_range': [0, 1],
                                                           'is_patch_data': True,
                                                           'channel_def': {'0': 'image'}}},
                                      'outputs': {'pred': {'type': 'image',
                                                           'format': 'labels',
                                                           'num_channels': 3,
                                                           'spatial_shape': [96, 96, 96],
                                                           'dtype': 'float32',
                                                           'value_range': [],
                                                           'is_patch_data': True,
                                                           'channel_def': {'0': 'background',
                                                                           '1': 'central gland',
                                                                           '2': 'peripheral zone'}}}}}}
