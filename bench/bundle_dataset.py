"""segq against a MONAI bundle's own ``monai.bundle run``, on the same CT dataset, in one run.

The bundle is Model Zoo's spleen_ct_segmentation: its real ``configs/inference.json``, ``metadata.json`` and
``logging.conf`` (Project-MONAI/model-zoo at commit dfae206df112837d817e78d3727c9f32b3b52e82, embedded below
verbatim), with random weights (``torch.manual_seed(0)``, MONAI's UNet as ``network_def`` builds it, saved as the
``models/model.pt`` state dict). Random weights give logits within a hair of each other; so the network's last
block is rescaled (exactly: see :func:`write_bundle`) until the spleen-minus-background logit has a spread of 4
over a calibration case through the bundle's own preprocessing and inferer, and the spleen bias is shifted so
that ``--label-fraction`` of that case is spleen. The cases are synthetic CTs made once: ``--cases`` body-like
int16 phantoms in HU (air, fat, soft tissue, lungs, spine, liver and a "spleen" blob within the config's
-57..164 HU window; 10 HU of in-plane correlated noise and 3 HU of white noise), ``--size`` 512,512,110 at
``--spacing`` 0.78,0.78,2.5 mm (an LPS-stored affine, so ``Orientationd`` flips them), as
``<data>/imagesTs/ctNNN.nii.gz``: the config's ``datalist`` globs ``@dataset_dir/imagesTs/*.nii.gz``.

Arms (``--arms``, in this order):

- **bundle**: ``python -m monai.bundle run --config_file <b>/configs/inference.json --bundle_root <b>
  --dataset_dir <data> --output_dir <o>``, nothing else changed (its evaluator runs ``amp: true``, autocast fp16,
  on cuda:0; its loader 4 worker processes; SaveImaged writes ``<o>/<stem>/<stem>_trans.nii.gz``, float32). Timed
  from the process start to its exit; the outputs' mtimes split that into start-up (to the first case's output,
  less one steady case) and a steady time a case.
- **segq**: a real launcher, ``segq worker --gpus N`` (``--gpus 0``: one CPU worker, ``--gpus none -c 1``, as
  bench/throughput.py runs them) on a deployment of its own (Redis flushed, SQLite, storage), warmed up with
  ``--warmup`` other cases a GPU (excluded), then the cases submitted at once with ``--model <bundle>`` and timed
  from the start of ``segq submit`` to the last mask (the jobs' own timestamps). ``SEGQ_PRECISION`` is fp16 on a
  GPU by default, like the bundle's autocast (``--precision fp32`` for fp32; a CPU worker runs fp32). The timeline
  (table ``steps``) gives the GPU busy fraction, and each step's median and total seconds (prepare, infer, merge).
- **profile** (optional): the same workflow run in a child process as ``monai.bundle run`` runs it
  (``create_workflow``, ``run``, ``finalize``) with timers on its ignite events (waiting for the loader, the
  forward pass to the device and through the inferer, each postprocessing transform: Activationsd, Invertd,
  AsDiscreted, SaveImaged): where the bundle run's time goes. A second, separate run; its outputs are not compared.

Agreement: every segq label map (``<masks>/<stem>_seg.nii.gz``) against the bundle run's, voxel for voxel: the
fraction of voxels equal and each label's Dice, the minimum over the cases. Targets (the issue): segq at least 3x
the bundle's cases/hour (5x the moonshot), voxels >= 99.9% equal, each label's Dice >= 0.999.

    python -m bench.bundle_dataset --redis-server .whl/redis/redis-server --gpus 1 --out "$OUT"
    python -m bench.bundle_dataset --cases 3 --size 64,64,24 --gpus 0          # a CPU smoke run

JSON lines go to <out>/bundle_dataset.jsonl (bench.common.emit). This process never initialises CUDA.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import ROOT, deployment_env, emit, run_in_tempdir

logger = logging.getLogger("segq.bench.bundle_dataset")

ZOO_COMMIT = "dfae206df112837d817e78d3727c9f32b3b52e82"
ARMS = ("bundle", "segq", "profile")  # the run's order: the optional profile last, where a budget cuts first
TARGET_RATIO, MOONSHOT_RATIO, TARGET_AGREEMENT, TARGET_DICE = 3.0, 5.0, 0.999, 0.999
OUTPUT_POSTFIX = "trans"  # the config's output_postfix
LABELS = (0, 1)  # metadata.json's channel_def: 0 background, 1 spleen

# models/spleen_ct_segmentation/configs/inference.json at ZOO_COMMIT, verbatim.
INFERENCE_JSON = r"""{
    "imports": [
        "$import glob",
        "$import numpy",
        "$import os"
    ],
    "bundle_root": ".",
    "image_key": "image",
    "output_dir": "$@bundle_root + '/eval'",
    "output_ext": ".nii.gz",
    "output_dtype": "$numpy.float32",
    "output_postfix": "trans",
    "separate_folder": true,
    "load_pretrain": true,
    "dataset_dir": "/workspace/data/Task09_Spleen",
    "datalist": "$list(sorted(glob.glob(@dataset_dir + '/imagesTs/*.nii.gz')))",
    "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
    "network_def": {
        "_target_": "UNet",
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": 2,
        "channels": [
            16,
            32,
            64,
            128,
            256
        ],
        "strides": [
            2,
            2,
            2,
            2
        ],
        "num_res_units": 2,
        "norm": "batch"
    },
    "network": "$@network_def.to(@device)",
    "preprocessing": {
        "_target_": "Compose",
        "transforms": [
            {
                "_target_": "LoadImaged",
                "keys": "@image_key"
            },
            {
                "_target_": "EnsureChannelFirstd",
                "keys": "@image_key"
            },
            {
                "_target_": "Orientationd",
                "keys": "@image_key",
                "axcodes": "RAS"
            },
            {
                "_target_": "Spacingd",
                "keys": "@image_key",
                "pixdim": [
                    1.5,
                    1.5,
                    2.0
                ],
                "mode": "bilinear"
            },
            {
                "_target_": "ScaleIntensityRanged",
                "keys": "@image_key",
                "a_min": -57,
                "a_max": 164,
                "b_min": 0,
                "b_max": 1,
                "clip": true
            },
            {
                "_target_": "EnsureTyped",
                "keys": "@image_key"
            }
        ]
    },
    "dataset": {
        "_target_": "Dataset",
        "data": "$[{'image': i} for i in @datalist]",
        "transform": "@preprocessing"
    },
    "dataloader": {
        "_target_": "DataLoader",
        "dataset": "@dataset",
        "batch_size": 1,
        "shuffle": false,
        "num_workers": 4
    },
    "inferer": {
        "_target_": "SlidingWindowInferer",
        "roi_size": [
            96,
            96,
            96
        ],
        "sw_batch_size": 4,
        "overlap": 0.5
    },
    "postprocessing": {
        "_target_": "Compose",
        "transforms": [
            {
                "_target_": "Activationsd",
                "keys": "pred",
                "softmax": true
            },
            {
                "_target_": "Invertd",
                "keys": "pred",
                "transform": "@preprocessing",
                "orig_keys": "@image_key",
                "nearest_interp": false,
                "to_tensor": true
            },
            {
                "_target_": "AsDiscreted",
                "keys": "pred",
                "argmax": true
            },
            {
                "_target_": "SaveImaged",
                "keys": "pred",
                "output_dir": "@output_dir",
                "output_ext": "@output_ext",
                "output_dtype": "@output_dtype",
                "output_postfix": "@output_postfix",
                "separate_folder": "@separate_folder"
            }
        ]
    },
    "handlers": [
        {
            "_target_": "StatsHandler",
            "iteration_log": false
        }
    ],
    "evaluator": {
        "_target_": "SupervisedEvaluator",
        "device": "@device",
        "val_data_loader": "@dataloader",
        "network": "@network",
        "inferer": "@inferer",
        "postprocessing": "@postprocessing",
        "val_handlers": "@handlers",
        "amp": true
    },
    "checkpointloader": {
        "_target_": "CheckpointLoader",
        "load_path": "$@bundle_root + '/models/model.pt'",
        "load_dict": {
            "model": "@network"
        }
    },
    "initialize": [
        "$monai.utils.set_determinism(seed=123)",
        "$@checkpointloader(@evaluator) if @load_pretrain else None"
    ],
    "run": [
        "$@evaluator.run()"
    ]
}
"""

# models/spleen_ct_segmentation/configs/metadata.json at ZOO_COMMIT, verbatim.
METADATA_JSON = (r"""{
    "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"""
    r"""meta_schema_20220324.json",
    "version": "0.5.9",
    "changelog": {
        "0.5.9": "use monai 1.4 and update large files",
        "0.5.8": "update to use monai 1.3.2",
        "0.5.7": "update to use monai 1.3.1",
        "0.5.6": "add load_pretrain flag for infer",
        "0.5.5": "add checkpoint loader for infer",
        "0.5.4": "update to use monai 1.3.0",
        "0.5.3": "fix the wrong GPU index issue of multi-node",
        "0.5.2": "remove error dollar symbol in readme",
        "0.5.1": "add RAM warning",
        "0.5.0": "update the README file with the ONNX-TensorRT conversion",
        "0.4.9": "update TensorRT descriptions",
        "0.4.8": "update deterministic training results",
        "0.4.7": "update the TensorRT part in the README file",
        "0.4.6": "fix mgpu finalize issue",
        "0.4.5": "enable deterministic training",
        "0.4.4": "add the command of executing inference with TensorRT models",
        "0.4.3": "fix figure and weights inconsistent error",
        "0.4.2": "use torch 1.13.1",
        "0.4.1": "update the readme file with TensorRT convert",
        "0.4.0": "fix multi-gpu train config typo",
        "0.3.9": "adapt to BundleWorkflow interface",
        "0.3.8": "add name tag",
        "0.3.7": "restructure readme to match updated template",
        "0.3.6": "enhance readme with details of model training",
        "0.3.5": "update to use monai 1.0.1",
        "0.3.4": "enhance readme on commands example",
        "0.3.3": "fix license Copyright error",
        "0.3.2": "improve multi-gpu logging",
        "0.3.1": "add multi-gpu evaluation config",
        "0.3.0": "update license files",
        "0.2.0": "unify naming",
        "0.1.1": "disable image saving during evaluation",
        "0.1.0": "complete the model package",
        "0.0.1": "initialize the model package structure"
    },
    "monai_version": "1.4.0",
    "pytorch_version": "2.4.0",
    "numpy_version": "1.24.4",
    "optional_packages_version": {
        "nibabel": "5.2.1",
        "pytorch-ignite": "0.4.11"
    },
    "name": "Spleen CT segmentation",
    "task": "Decathlon spleen segmentation",
    "description": "A pre-trained model for volumetric (3D) segmentation of the spleen from CT image",
    "authors": "MONAI team",
    "copyright": "Copyright (c) MONAI Consortium",
    "data_source": "Task09_Spleen.tar from http://medicaldecathlon.com/",
    "data_type": "nibabel",
    "image_classes": "single channel data, intensity scaled to [0, 1]",
    "label_classes": "single channel data, 1 is spleen, 0 is everything else",
    "pred_classes": "2 channels OneHot data, channel 1 is spleen, channel 0 is background",
    "eval_metrics": {
        "mean_dice": 0.961
    },
    "intended_use": "This is an example, not to be used for diagnostic purposes",
    "references": [
        "Xia, Yingda, et al. '3D Semi-Supervised Learning with Uncertainty-Aware Multi-View"""
    r""" Co-Training. arXiv preprint arXiv:1811.12506 (2018). https://arxiv.org/abs/1811.12506.",
        "Kerfoot E., Clough J., Oksuz I., Lee J., King A.P., Schnabel J.A. (2019) Left-Ventricle"""
    r""" Quantification Using Residual U-Net. In: Pop M. et al. (eds) Statistical Atlases and Computational"""
    r""" Models of the Heart. Atrial Segmentation and LV Quantification Challenges. STACOM 2018. Lecture"""
    r""" Notes in Computer Science, vol 11395. Springer, Cham. https://doi.org/10.1007/978-3-030-12029-0_40"
    ],
    "network_data_format": {
        "inputs": {
            "image": {
                "type": "image",
                "format": "hounsfield",
                "modality": "CT",
                "num_channels": 1,
                "spatial_shape": [
                    96,
                    96,
                    96
                ],
                "dtype": "float32",
                "value_range": [
                    0,
                    1
                ],
                "is_patch_data": true,
                "channel_def": {
                    "0": "image"
                }
            }
        },
        "outputs": {
            "pred": {
                "type": "image",
                "format": "segmentation",
                "num_channels": 2,
                "spatial_shape": [
                    96,
                    96,
                    96
                ],
                "dtype": "float32",
                "value_range": [
                    0,
                    1
                ],
                "is_patch_data": true,
                "channel_def": {
                    "0": "background",
                    "1": "spleen"
                }
            }
        }
    }
}
""")

# models/spleen_ct_segmentation/configs/logging.conf at ZOO_COMMIT, verbatim.
LOGGING_CONF = r"""[loggers]
keys=root

[handlers]
keys=consoleHandler

[formatters]
keys=fullFormatter

[logger_root]
level=INFO
handlers=consoleHandler

[handler_consoleHandler]
class=StreamHandler
level=INFO
formatter=fullFormatter
args=(sys.stdout,)

[formatter_fullFormatter]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""


# --- arguments -------------------------------------------------------------------------------------------------


def int_triple(text: str) -> tuple[int, int, int]:
    parts = [p for p in text.replace("x", ",").split(",") if p.strip()]
    if len(parts) != 3 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not three positive integers, e.g. 512,512,110")
    return int(parts[0]), int(parts[1]), int(parts[2])


def float_triple(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not three numbers, e.g. 0.78,0.78,2.5") from None
    if len(values) != 3 or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not three positive numbers, e.g. 0.78,0.78,2.5")
    return values[0], values[1], values[2]


def arm_list(text: str) -> list[str]:
    arms = [a.strip() for a in text.split(",") if a.strip()]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown or not arms:
        raise argparse.ArgumentTypeError(f"unknown arm(s) {', '.join(unknown) or text!r}: "
                                         f"choose from {', '.join(ARMS)}")
    return [a for a in ARMS if a in arms]  # always in ARMS' order


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", type=arm_list, default=arm_list("bundle,segq"),
                        help=f"Which of {', '.join(ARMS)} to run (default bundle,segq).")
    parser.add_argument("--gpus", type=int, default=1,
                        help="GPUs of the segq launcher (0: one CPU worker; the bundle then runs on the CPU too). "
                             "The bundle's own run uses one device whatever this says.")
    parser.add_argument("--cases", type=int, default=40)
    parser.add_argument("--size", type=int_triple, default=(512, 512, 110), help="Voxels of a case, X,Y,Z.")
    parser.add_argument("--spacing", type=float_triple, default=(0.78, 0.78, 2.5), help="Millimetres, X,Y,Z.")
    parser.add_argument("--warmup", type=int, default=3, help="Warm-up cases a GPU for segq (excluded).")
    parser.add_argument("--label-fraction", type=float, default=0.1,
                        help="Spleen fraction of a calibration case that the random weights' bias aims at.")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp16", "fp32", "bf16"],
                        help="SEGQ_PRECISION (auto: fp16 on a GPU, like the bundle's amp; fp32 on a CPU).")
    parser.add_argument("--torch-compile", default="auto", help="SEGQ_TORCH_COMPILE for the segq arm.")
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--sw-batch-size", type=int, default=None,
                        help="segq submit --sw-batch-size (default: the bundle's inferer, 4).")
    parser.add_argument("--max-windows-per-subtask", type=int, default=1024)
    parser.add_argument("--coordinator-concurrency", type=int, default=None,
                        help="Processes of segq's coordinator (default: the launcher's, which follows the cores).")
    parser.add_argument("--redis-server", type=Path, default=None, help="Start this redis-server binary.")
    parser.add_argument("--redis-port", type=int, default=6392)
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/12",
                        help="Without --redis-server: a Redis database this run may flush.")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="Seconds for the whole run: each arm is given what is left (less a reserve for the "
                             "comparison) and cut, with what it finished recorded, when it runs over.")
    parser.add_argument("--timeout", type=float, default=1800, help="Seconds an arm may take without a budget.")
    parser.add_argument("--keep", action="store_true", help="Keep the work directory (cases, outputs, logs).")
    parser.add_argument("--out", type=Path, default=None, help="Directory for bundle_dataset.jsonl and the logs.")
    args = parser.parse_args(argv)
    if args.cases < 1 or args.warmup < 0 or args.gpus < 0:
        parser.error("--cases must be at least 1, --warmup and --gpus at least 0")
    if args.precision == "auto":
        args.precision = "fp16" if args.gpus else "fp32"
    elif args.precision == "fp16" and not args.gpus:
        parser.error("--precision fp16 needs a GPU (segq's CPU workers run fp32 or bf16)")
    return args


class Budget:
    """What is left of ``--time-budget`` (or ``--timeout`` an arm without one), less ``reserve`` seconds."""

    def __init__(self, total: float | None, per_arm: float, started: float | None = None) -> None:
        self.total, self.per_arm = total, per_arm
        self.started = time.monotonic() if started is None else started

    def left(self, reserve: float = 0.0) -> float:
        if self.total is None:
            return self.per_arm
        return max(0.0, self.total - (time.monotonic() - self.started) - reserve)


# --- the cases and the bundle ----------------------------------------------------------------------------------


def case_affine(spacing: Sequence[float], shape: Sequence[int]) -> np.ndarray:
    """An LPS-stored CT's affine (x and y negative, as DICOM converters write them), centred on the origin."""
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = [spacing[0] * shape[0] / 2, spacing[1] * shape[1] / 2, -spacing[2] * shape[2] / 2]
    return affine


def phantom(shape: Sequence[int], seed: int) -> np.ndarray:
    """A body-like CT in HU (int16, X,Y,Z): air, a fat rim, soft tissue, lungs in the upper slices, a spine, a
    liver and a spleen blob (90..130 HU, inside the bundle's -57..164 window) whose place varies with ``seed``; noise as
    :func:`correlated_noise` makes it."""
    rng = np.random.default_rng(seed)
    nx, ny, nz = shape
    u = np.linspace(-1, 1, nx, dtype=np.float32)[:, None, None]
    v = np.linspace(-1, 1, ny, dtype=np.float32)[None, :, None]
    w = np.linspace(0, 1, nz, dtype=np.float32)[None, None, :]
    volume = np.full(shape, -1000.0, dtype=np.float32)
    body = (u / 0.86) ** 2 + (v / 0.64) ** 2
    volume[np.broadcast_to(body < 1, shape)] = -100.0  # fat under the skin
    volume[np.broadcast_to(body < 0.85, shape)] = 40.0  # soft tissue
    for side in (-1, 1):  # lungs, in the upper 40% of the slices
        lung = ((u - side * 0.38) / 0.3) ** 2 + ((v + 0.05) / 0.36) ** 2 + ((w - 1.0) / 0.42) ** 2
        volume[lung < 1] = -850.0
    spine = (u / 0.09) ** 2 + ((v - 0.42) / 0.09) ** 2
    volume[np.broadcast_to(spine < 1, shape)] = 650.0
    volume[np.broadcast_to(spine < 0.45, shape)] = 250.0
    liver = ((u + 0.36) / 0.32) ** 2 + ((v + 0.02) / 0.36) ** 2 + ((w - 0.5) / 0.3) ** 2
    volume[liver < 1] = 60.0
    cx, cy, cz = 0.45 + rng.uniform(-0.06, 0.06), 0.12 + rng.uniform(-0.06, 0.06), 0.55 + rng.uniform(-0.08, 0.08)
    spleen = ((u - cx) / 0.13) ** 2 + ((v - cy) / 0.17) ** 2 + ((w - cz) / 0.2) ** 2
    volume[spleen < 1] = float(rng.uniform(90, 130))
    volume += correlated_noise(shape, rng, coarse=NOISE_CORRELATED_HU, fine=NOISE_WHITE_HU)
    return np.clip(np.rint(volume), -1024, 3071).astype(np.int16)


NOISE_CORRELATED_HU, NOISE_WHITE_HU = 10.0, 3.0


def correlated_noise(shape: Sequence[int], rng: np.random.Generator, coarse: float, fine: float,
                     grain: int = 4) -> np.ndarray:
    """CT-like noise: a field correlated over about ``grain`` voxels in-plane (``coarse`` HU, white noise on a
    grid ``grain`` times coarser, linearly interpolated) plus ``fine`` HU of white noise."""
    nx, ny, nz = shape
    small = rng.standard_normal((nx // grain + 2, ny // grain + 2, nz), dtype=np.float32)
    xs = np.arange(nx, dtype=np.float32) / grain
    ys = np.arange(ny, dtype=np.float32) / grain
    x0, y0 = xs.astype(np.int64), ys.astype(np.int64)
    fx, fy = (xs - x0)[:, None, None], (ys - y0)[None, :, None]
    along_x = small[x0] * (1 - fx) + small[x0 + 1] * fx
    field = along_x[:, y0] * (1 - fy) + along_x[:, y0 + 1] * fy
    field *= coarse / max(float(field.std()), 1e-6)
    field += rng.standard_normal(tuple(shape), dtype=np.float32) * fine
    return field


def _write_case(path: Path, shape: tuple[int, int, int], spacing: tuple[float, float, float], seed: int) -> Path:
    import nibabel as nib

    image = nib.Nifti1Image(phantom(shape, seed), case_affine(spacing, shape))
    image.header.set_xyzt_units("mm", "sec")
    image.set_qform(image.affine, code=1)
    image.set_sform(image.affine, code=1)
    nib.save(image, str(path))
    return path


def make_cases(directory: Path, count: int, shape: tuple[int, int, int], spacing: tuple[float, float, float],
               seed: int = 0, prefix: str = "ct") -> list[Path]:
    """``count`` phantoms as ``<directory>/imagesTs/<prefix>NNN.nii.gz``, several processes writing at once (gzip
    is single-threaded). Forks: call it before this process starts torch's threads."""
    from concurrent.futures import ProcessPoolExecutor

    folder = directory / "imagesTs"
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{prefix}{i:03d}.nii.gz" for i in range(count)]
    if count == 0:
        return []
    with ProcessPoolExecutor(max_workers=max(1, min(count, (os.cpu_count() or 1) // 2))) as pool:
        return list(pool.map(_write_case, paths, [shape] * count, [spacing] * count,
                             [seed + i for i in range(count)]))


def write_bundle(root: Path, calibration: Path | None, label_fraction: float, spread: float = 4.0) -> dict[str, Any]:
    """The spleen bundle at ``root``: the real configs, random weights (seed 0) in models/model.pt. With a
    ``calibration`` case (run through the bundle's own preprocessing and sliding-window inferer, on the CPU),
    the network's last block is rescaled so that the spleen-minus-background logit has a standard deviation of
    ``spread`` over the case, and the spleen channel's final bias shifted so that ``label_fraction`` of the case
    is labelled spleen. The rescaling is exact: the last block is BatchNorm, PReLU (positively homogeneous) and a
    residual convolution, so scaling the BatchNorm's affine and the convolution's bias scales the output."""
    import torch
    from monai.bundle import ConfigParser

    (root / "configs").mkdir(parents=True, exist_ok=True)
    (root / "models").mkdir(exist_ok=True)
    (root / "configs" / "inference.json").write_text(INFERENCE_JSON)
    (root / "configs" / "metadata.json").write_text(METADATA_JSON)
    (root / "configs" / "logging.conf").write_text(LOGGING_CONF)
    parser = ConfigParser(json.loads(INFERENCE_JSON))
    torch.manual_seed(0)
    network = parser.get_parsed_content("network_def").eval()
    up, last = network.model[2][0], network.model[2][1]  # UNet's top: ConvTranspose+ADN(N, D, A), ResidualUnit
    norm, conv = up.adn.N, last.conv.unit0.conv
    if not (isinstance(norm, torch.nn.BatchNorm3d) and isinstance(up.adn.A, torch.nn.PReLU)
            and isinstance(last.residual, torch.nn.Identity) and conv.out_channels == 2):
        raise RuntimeError("the spleen UNet's last block is not BatchNorm3d, PReLU and a residual Conv3d")
    scale, shift = 1.0, 0.0
    if calibration is not None:
        image = parser.get_parsed_content("preprocessing")({"image": str(calibration)})["image"].as_tensor()
        inferer = parser.get_parsed_content("inferer")  # the bundle's own sliding windows, in fp32
        with torch.inference_mode():
            logits = inferer(image[None].float(), network)[0]
        margin = (logits[1] - logits[0]).flatten()
        margin = margin[:: max(1, margin.numel() // 2_000_000)]
        scale = spread / max(float(margin.std()), 1e-6)
        shift = -float(torch.quantile(margin * scale, 1.0 - label_fraction))
    with torch.no_grad():
        norm.weight.mul_(scale)
        norm.bias.mul_(scale)
        conv.bias.mul_(scale)
        conv.bias[1] += shift
    state = network.state_dict()
    torch.save(state, root / "models" / "model.pt")
    return {"bundle": "spleen_ct_segmentation", "zoo_commit": ZOO_COMMIT, "weights": "random, torch.manual_seed(0)",
            "last_block_scale": round(scale, 4), "spleen_bias_shift": round(shift, 4),
            "label_fraction_target": label_fraction if calibration is not None else None,
            "parameters": int(sum(v.numel() for v in state.values() if v.is_floating_point()))}


# --- where outputs land, and their agreement --------------------------------------------------------------------


def case_stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def bundle_output(out_dir: Path, case: Path, postfix: str = OUTPUT_POSTFIX) -> Path:
    """SaveImaged's path for ``case`` with the config's ``separate_folder: true`` and ``output_ext: .nii.gz``."""
    stem = case_stem(case)
    return out_dir / stem / f"{stem}_{postfix}.nii.gz"


def segq_output(out_dir: Path, case: Path) -> Path:
    """segq's label map for ``case``, submitted as a file: ``<out>/<name>_seg.nii.gz``."""
    return out_dir / f"{case_stem(case)}_seg.nii.gz"


def label_agreement(ours: np.ndarray, theirs: np.ndarray, labels: Sequence[int] = LABELS) -> dict[str, Any]:
    """Voxels equal (fraction) and each label's Dice (1.0 where neither map has it) of two label maps."""
    if ours.shape != theirs.shape:
        raise ValueError(f"label maps of shapes {list(ours.shape)} and {list(theirs.shape)} cannot be compared")
    present = sorted({*labels, *np.unique(ours).tolist(), *np.unique(theirs).tolist()})
    dice: dict[str, float] = {}
    for label in present:
        a, b = ours == label, theirs == label
        sizes = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
        dice[str(int(label))] = 2.0 * int(np.count_nonzero(a & b)) / sizes if sizes else 1.0
    return {"voxels": int(ours.size), "equal_fraction": float(np.count_nonzero(ours == theirs)) / ours.size,
            "dice": dice, "fraction": {str(int(k)): float(np.count_nonzero(theirs == k)) / theirs.size
                                       for k in present}}


def read_labels(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A label map's voxels as integers (SaveImaged writes the argmax as float32) with its affine."""
    import nibabel as nib

    image = nib.load(str(path))
    data = np.asarray(image.dataobj)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.dtype.kind == "f":
        data = np.rint(data)
    return data.astype(np.int16), image.affine


def compare_case(case: Path, bundle_dir: Path, segq_dir: Path) -> dict[str, Any]:
    theirs, theirs_affine = read_labels(bundle_output(bundle_dir, case))
    ours, ours_affine = read_labels(segq_output(segq_dir, case))
    record = {"case": case_stem(case), **label_agreement(ours, theirs)}
    record["affine_equal"] = bool(np.allclose(ours_affine, theirs_affine, atol=1e-4))
    return record


def agreement(cases: Sequence[Path], bundle_dir: Path, segq_dir: Path) -> dict[str, Any]:
    """Every case's agreement and the minimum over the cases; cases either arm did not finish are counted apart."""
    both = [c for c in cases if bundle_output(bundle_dir, c).is_file() and segq_output(segq_dir, c).is_file()]
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:  # gzip and numpy drop the GIL
        per_case = list(pool.map(lambda c: compare_case(c, bundle_dir, segq_dir), both))
    return summarise_agreement(per_case, len(cases))


def summarise_agreement(per_case: list[dict[str, Any]], cases: int) -> dict[str, Any]:
    if not per_case:
        return {"cases_compared": 0, "cases": cases}
    labels = sorted({k for r in per_case for k in r["dice"]}, key=int)
    worst = min(per_case, key=lambda r: r["equal_fraction"])
    min_dice = {k: min(r["dice"].get(k, 1.0) for r in per_case) for k in labels}
    return {"cases_compared": len(per_case), "cases": cases,
            "min_equal_fraction": worst["equal_fraction"], "worst_case": worst["case"],
            "mean_equal_fraction": statistics.fmean(r["equal_fraction"] for r in per_case),
            "min_dice": min_dice, "affines_equal": all(r["affine_equal"] for r in per_case),
            "spleen_fraction_bundle": summary_or_none([r["fraction"].get("1", 0.0) for r in per_case]),
            "meets_target": (len(per_case) == cases and worst["equal_fraction"] >= TARGET_AGREEMENT
                             and min(min_dice.values()) >= TARGET_DICE),
            "per_case": per_case}


def summary_or_none(values: list[float]) -> dict[str, float] | None:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)} if values else None


# --- the bundle's own run ----------------------------------------------------------------------------------------


def bundle_device_env(gpus: int) -> dict[str, str]:
    """One device for the bundle's run: the first visible GPU, or none (its config then picks the CPU)."""
    if gpus == 0:
        return {"CUDA_VISIBLE_DEVICES": ""}
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return {"CUDA_VISIBLE_DEVICES": visible.split(",")[0] if visible else "0"}


def bundle_command(bundle: Path, data: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / "inference.json"),
            "--bundle_root", str(bundle), "--dataset_dir", str(data), "--output_dir", str(out)]


def run_timed(argv: list[str], env: dict[str, str], log: Path, timeout: float) -> tuple[float, float, int | None]:
    """Start ``argv`` (wall-clock start, seconds to its exit, its exit status; None when cut at ``timeout``)."""
    started_wall = time.time()
    started = time.perf_counter()
    with open(log, "ab") as handle:
        proc = subprocess.Popen(argv, env={**os.environ, **env}, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT,
                                start_new_session=True)
        try:
            code: int | None = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
            code = None
        except BaseException:  # SIGTERM of the whole run: do not leave the child running
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    return started_wall, time.perf_counter() - started, code


def output_times(started_wall: float, outputs: Sequence[Path]) -> dict[str, Any]:
    """The split of a bundle run from its outputs' mtimes (SaveImaged writes each case last in its iteration)."""
    marks = sorted(p.stat().st_mtime - started_wall for p in outputs if p.is_file())
    if not marks:
        return {"outputs": 0}
    gaps = [b - a for a, b in zip(marks, marks[1:], strict=False)]
    steady = (marks[-1] - marks[0]) / (len(marks) - 1) if len(marks) > 1 else None
    return {"outputs": len(marks), "first_output_seconds": round(marks[0], 3),
            "last_output_seconds": round(marks[-1], 3),
            "steady_seconds_per_case": round(steady, 4) if steady is not None else None,
            "median_gap_seconds": round(statistics.median(gaps), 4) if gaps else None,
            # the first case's output less one steady case: interpreter, imports, config, network, checkpoint,
            # the loader's workers
            "startup_seconds": round(marks[0] - (steady or 0.0), 3)}


def bundle_arm(args: argparse.Namespace, bundle: Path, data: Path, cases: Sequence[Path], work: Path,
               budget: Budget) -> dict[str, Any]:
    out = work / "bundle-out"
    log = work / "bundle.log"
    timeout = budget.left(reserve=60)
    started_wall, seconds, code = run_timed(bundle_command(bundle, data, out), bundle_device_env(args.gpus), log,
                                            timeout)
    copy_log(log, args.out, "bundle_run.log")
    outputs = [bundle_output(out, c) for c in cases]
    done = sum(p.is_file() for p in outputs)
    record: dict[str, Any] = {"arm": "bundle", "command": "python -m monai.bundle run --config_file "
                              "<b>/configs/inference.json --bundle_root <b> --dataset_dir <data> --output_dir <o>",
                              "exit_code": code, "cut_at_budget": code is None, "cases": len(cases),
                              "cases_done": done, "seconds": round(seconds, 3),
                              **output_times(started_wall, outputs)}
    if code not in (0, None):
        record["error"] = log.read_text(errors="replace")[-2000:]
    if code == 0 and done == len(cases):
        record["cases_per_hour"] = round(done / seconds * 3600, 1)
    elif done > 1 and record.get("steady_seconds_per_case"):  # cut: the rate of what it did finish
        record["cases_per_hour_partial"] = round(done / record["last_output_seconds"] * 3600, 1)
    return record


# --- the profiled bundle run (a child process) -------------------------------------------------------------------


class _Timed:
    """A postprocessing transform with a stopwatch (the device synchronised after it, so its own time counts)."""

    def __init__(self, transform: Any, sink: list[float], sync: Any) -> None:
        self.transform, self.sink, self.sync = transform, sink, sync

    def __call__(self, data: Any, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        result = self.transform(data, *args, **kwargs)
        self.sync()
        self.sink.append(time.perf_counter() - started)
        return result


def profile_child(bundle: Path, data: Path, out: Path, result: Path, started_wall: float) -> None:
    """``monai.bundle run``'s own steps (create_workflow: parse, initialize; run; finalize) with timers."""
    marks = {"process_started": started_wall, "child_main": time.time()}
    import torch
    from ignite.engine import Events
    from monai.bundle.scripts import create_workflow
    from monai.engines.utils import IterationEvents

    marks["imported"] = time.time()
    workflow = create_workflow(config_file=str(bundle / "configs" / "inference.json"), bundle_root=str(bundle),
                               dataset_dir=str(data), output_dir=str(out))
    marks["initialized"] = time.time()
    evaluator = workflow.parser.get_parsed_content("evaluator")  # the instance `run` uses: resolved once, cached
    post = workflow.parser.get_parsed_content("postprocessing")
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    names = [type(t).__name__ for t in post.transforms]
    per_transform: list[list[float]] = [[] for _ in names]
    post.transforms = tuple(_Timed(t, sink, sync) for t, sink in zip(post.transforms, per_transform, strict=True))
    times: dict[str, list[float]] = {"data_wait": [], "forward": [], "after_forward": [], "iteration": []}
    clock: dict[str, float] = {}

    def mark(name: str) -> Any:
        def handler(_engine: Any) -> None:
            clock[name] = time.perf_counter()
        return handler

    def since(name: str, into: str, synchronise: bool = False) -> Any:
        def handler(_engine: Any) -> None:
            if synchronise:
                sync()
            now = time.perf_counter()
            times[into].append(now - clock[name])
            clock[into] = now
        return handler

    evaluator.add_event_handler(Events.STARTED, lambda _e: marks.__setitem__("run_started", time.time()))
    evaluator.add_event_handler(Events.GET_BATCH_STARTED, mark("get"))
    evaluator.add_event_handler(Events.GET_BATCH_COMPLETED, since("get", "data_wait"))
    evaluator.add_event_handler(Events.ITERATION_STARTED, mark("iteration_started"))
    evaluator.add_event_handler(IterationEvents.FORWARD_COMPLETED, since("iteration_started", "forward", True))
    # registered after the evaluator's own decollate and postprocessing handlers: runs after them
    evaluator.add_event_handler(IterationEvents.MODEL_COMPLETED, since("forward", "after_forward", True))
    evaluator.add_event_handler(Events.ITERATION_COMPLETED, since("iteration_started", "iteration"))
    evaluator.add_event_handler(Events.COMPLETED, lambda _e: marks.__setitem__("run_completed", time.time()))
    workflow.run()
    workflow.finalize()
    marks["finalized"] = time.time()
    result.write_text(json.dumps({"marks": marks, "times": times,
                                  "postprocessing": {f"{i}:{n}": s for i, (n, s) in
                                                     enumerate(zip(names, per_transform, strict=True))},
                                  "device": str(workflow.parser.get_parsed_content("device")),
                                  "amp": bool(getattr(evaluator, "amp", False))}))


def profile_figures(raw: dict[str, Any]) -> dict[str, Any]:
    """Medians a case of each part of an iteration, and the start-up's parts, from the child's timers."""
    marks, times = raw["marks"], raw["times"]
    t0 = marks["process_started"]

    def med(values: list[float]) -> float | None:
        return round(statistics.median(values), 4) if values else None

    def total(values: list[float]) -> float:
        return round(sum(values), 3)

    phases = {"interpreter_to_main": marks["child_main"] - t0, "imports": marks["imported"] - marks["child_main"],
              "parse_and_initialize": marks["initialized"] - marks["imported"],
              "run": marks["run_completed"] - marks["run_started"],
              "finalize": marks["finalized"] - marks["run_completed"]}
    if "run_started" in marks:
        phases["engine_setup"] = marks["run_started"] - marks["initialized"]
    return {"device": raw.get("device"), "amp": raw.get("amp"), "iterations": len(times["iteration"]),
            "startup_phases_seconds": {k: round(v, 3) for k, v in phases.items()},
            "first_data_wait_seconds": round(times["data_wait"][0], 3) if times["data_wait"] else None,
            "median_seconds_per_case": {"data_wait": med(times["data_wait"][1:] or times["data_wait"]),
                                        "forward": med(times["forward"][1:] or times["forward"]),
                                        "postprocessing": med(times["after_forward"][1:] or times["after_forward"]),
                                        "iteration": med(times["iteration"][1:] or times["iteration"])},
            "first_forward_seconds": round(times["forward"][0], 3) if times["forward"] else None,
            "total_seconds": {"data_wait": total(times["data_wait"]), "forward": total(times["forward"]),
                              "postprocessing": total(times["after_forward"])},
            "median_postprocessing_seconds": {k: med(v[1:] or v) for k, v in raw["postprocessing"].items()},
            "total_wall_seconds": round(marks["finalized"] - t0, 3)}


def profile_arm(args: argparse.Namespace, bundle: Path, data: Path, work: Path, budget: Budget) -> dict[str, Any]:
    result = work / "profile.json"
    log = work / "profile.log"
    started_wall = time.time()
    argv = [sys.executable, "-m", "bench.bundle_dataset", "--profile-child", str(bundle), str(data),
            str(work / "profile-out"), str(result), repr(started_wall)]
    _wall, seconds, code = run_timed(argv, bundle_device_env(args.gpus), log, budget.left(reserve=60))
    copy_log(log, args.out, "bundle_profile.log")
    record: dict[str, Any] = {"arm": "profile", "exit_code": code, "seconds": round(seconds, 3)}
    if code == 0 and result.is_file():
        record.update(profile_figures(json.loads(result.read_text())))
    else:
        record["error"] = log.read_text(errors="replace")[-2000:]
    return record


# --- segq ----------------------------------------------------------------------------------------------------------


def step_figures(env: dict[str, str], dataset: str) -> dict[str, Any]:
    """Each step's (prepare, infer, merge) median and total seconds, and the device-held part of infer."""
    from sqlalchemy import select

    from segq.db import session_scope
    from segq.models import Dataset
    from segq.timeline import busy_interval, load_steps

    url = env["SEGQ_DATABASE_URL"]
    with session_scope(url) as s:
        ids = list(s.scalars(select(Dataset.id).where(Dataset.name == dataset)))
    steps = load_steps(ids, url)
    figures: dict[str, Any] = {}
    order = {"prepare": 0, "infer": 1, "merge": 2}
    for name in sorted({st.step for st in steps}, key=lambda n: (order.get(n, 3), n)):
        runs = [st for st in steps if st.step == name]
        seconds = [(st.finished_at - st.started_at).total_seconds() for st in runs]
        entry = {"runs": len(runs), "median_seconds": round(statistics.median(seconds), 4),
                 "total_seconds": round(sum(seconds), 3), "workers": len({st.worker for st in runs})}
        if name == "infer":
            held = [(b - a).total_seconds() for a, b in map(busy_interval, runs)]
            entry["median_device_seconds"] = round(statistics.median(held), 4)
            entry["total_device_seconds"] = round(sum(held), 3)
            entry["windows"] = sum(int(st.windows or 0) for st in runs)
        figures[name] = entry
    return figures


def submit_set(env: dict[str, str], inputs: Sequence[Path], out: Path, model: Path, name: str, max_windows: int,
               timeout: float, extra: Sequence[str] = ()) -> tuple[float, list[dict[str, Any]], str | None]:
    """``segq submit --wait`` of every input as one dataset: the wall seconds, the result rows, and what went wrong
    (a timeout, failed cases) or None. Unlike bench.throughput.run_set, a cut run still gives its rows."""
    argv = [sys.executable, "-m", "segq.cli", "submit", *map(str, inputs), "--out", str(out), "--model", str(model),
            "--name", name, "--wait", "--timeout", str(max(1.0, timeout)), "--max-windows-per-subtask",
            str(max_windows), *extra]
    started = time.perf_counter()
    result = subprocess.run(argv, env={**os.environ, **env}, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    listed = subprocess.run([sys.executable, "-m", "segq.cli", "results", name, "--format", "json"],
                            env={**os.environ, **env}, cwd=ROOT, capture_output=True, text=True)
    rows = json.loads(listed.stdout) if listed.returncode == 0 and listed.stdout.strip() else []
    problem = None
    if result.returncode != 0:
        failed = [r for r in rows if r.get("status") == "failed"]
        problem = (f"segq submit exited {result.returncode}: {(result.stdout + result.stderr)[-1500:]}"
                   + (f"; first failure: {failed[0].get('error')}" if failed else ""))
    return seconds, rows, problem


def segq_arm(args: argparse.Namespace, root: Path, broker: str, bundle: Path, warmup: Sequence[Path],
             cases: Sequence[Path], budget: Budget) -> dict[str, Any]:
    import redis

    from bench.scale_gpus import WorkspaceCount, engine_ready_seconds, keep_log, timeline_figures
    from bench.throughput import launched, run_set

    arm_root = root / "segq"
    arm_root.mkdir()
    redis.Redis.from_url(broker).flushdb()
    env = {**deployment_env(arm_root, broker), "SEGQ_PRECISION": args.precision, "SEGQ_BACKEND": args.backend,
           "SEGQ_TORCH_COMPILE": args.torch_compile, "SEGQ_ENGINE_DIR": str(root / "engines")}
    if args.gpus:
        worker_args, ready = ["--gpus", str(args.gpus), "-n", "bundlebench"], args.gpus + 1
    else:  # as bench/throughput.py: CPU workers on the gpu queues, plus the coordinator
        worker_args, ready = ["--gpus", "none", "-c", "1", "-n", "bundlebench"], 2
    if args.coordinator_concurrency:
        worker_args += ["--coordinator-concurrency", str(args.coordinator_concurrency)]
    extra = ["--sw-batch-size", str(args.sw_batch_size)] if args.sw_batch_size else []
    log_copy = (args.out or arm_root) / "segq_workers.log"
    record: dict[str, Any] = {"arm": "segq", "gpus": args.gpus, "precision": args.precision,
                              "torch_compile": args.torch_compile, "cases": len(cases)}
    launcher_started = time.perf_counter()
    with keep_log(arm_root / "workers.log", log_copy), launched(env, arm_root / "workers.log", worker_args, ready):
        record["launcher_ready_seconds"] = round(time.perf_counter() - launcher_started, 3)
        if warmup:
            started = time.perf_counter()
            run_set(env, warmup, arm_root / "warmup", bundle, "warmup", args.max_windows_per_subtask,
                    budget.left(reserve=90), extra)
            record["warmup_cases"], record["warmup_seconds"] = len(warmup), round(time.perf_counter() - started, 3)
        submitted = datetime.now(UTC)
        with WorkspaceCount(arm_root / "storage") as workspaces:
            set_timeout = budget.left(reserve=45)
            wait, rows, problem = submit_set(env, cases, arm_root / "masks", bundle, "set",
                                             args.max_windows_per_subtask, set_timeout, extra)
        figures = timeline_figures(env, "set", submitted)
        steps = step_figures(env, "set")
    done = [r for r in rows if r.get("status") == "done"]
    if problem:  # cut at the budget, or some cases failed: what did finish is still recorded
        record.update({"error": problem, "cut_at_budget": wait >= set_timeout - 2})
    wall = figures["to_last_mask_seconds"] or wait
    if figures["to_last_mask_seconds"] and figures["queued_to_mask_seconds"]:
        # `segq submit` itself: its start-up, reading the bundle, hashing the inputs, writing the rows
        record["submit_to_queued_seconds"] = round(wall - figures["queued_to_mask_seconds"], 3)
    rate_key = "cases_per_hour" if len(done) == len(cases) else "cases_per_hour_partial"
    record.update({"cases_done": len(done), "seconds": round(wall, 3),
                   rate_key: round(len(done) / wall * 3600, 1) if done and wall else None,
                   "submit_wait_seconds": round(wait, 3),
                   "engine_ready_seconds": engine_ready_seconds(arm_root / "workers.log"),
                   "max_workspaces": workspaces.most, "steps": steps, **figures,
                   "masks": str(arm_root / "masks")})
    return record


# --- the run -------------------------------------------------------------------------------------------------------


def write_line(record: dict[str, Any], out: Path | None) -> None:
    if out is not None:
        with open(out, "a") as handle:
            handle.write(json.dumps(record) + "\n")


def copy_log(log: Path, out: Path | None, name: str) -> None:
    if out is not None and log.exists():
        shutil.copyfile(log, out / name)


def ratios(records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    bundle, ours = records.get("bundle", {}), records.get("segq", {})
    theirs = bundle.get("cases_per_hour")
    mine = ours.get("cases_per_hour")
    if not theirs or not mine:
        return {}
    ratio = mine / theirs
    out: dict[str, Any] = {"ratio_cases_per_hour": round(ratio, 3), "meets_target_3x": ratio >= TARGET_RATIO,
                           "meets_moonshot_5x": ratio >= MOONSHOT_RATIO}
    if bundle.get("steady_seconds_per_case") and ours.get("queued_to_mask_seconds"):
        # without either's start-up: the bundle's steady rate against segq's job rows' own span
        steady_ours = ours["queued_to_mask_seconds"] / ours["cases_done"]
        out["ratio_steady"] = round(bundle["steady_seconds_per_case"] / steady_ours, 3)
    return out


def print_table(records: dict[str, dict[str, Any]], summary: dict[str, Any]) -> None:
    def fmt(value: Any, spec: str) -> str:
        return format(value, spec) if isinstance(value, int | float) else "-"

    base = records.get("bundle", {}).get("cases_per_hour")
    print()
    print(f"{'arm':<22} {'cases':>5} {'seconds':>9} {'s/case':>8} {'cases/h':>9} {'x bundle':>9}")
    for name in ("bundle", "segq", "profile"):
        r = records.get(name)
        if not r:
            continue
        done = r.get("cases_done", r.get("iterations"))
        chp = r.get("cases_per_hour") or r.get("cases_per_hour_partial")
        label = {"bundle": "monai.bundle run", "profile": "bundle run, profiled",
                 "segq": f"segq ({r.get('precision')}, {r.get('gpus')} GPU)" if r.get("gpus") else
                 f"segq ({r.get('precision')}, CPU)"}[name]
        if name == "profile":
            chp = r["iterations"] / r["seconds"] * 3600 if r.get("iterations") else None
        per_case = r["seconds"] / done if done else None
        ratio = chp / base if chp and base else None
        cut = "  (cut at the budget)" if r.get("cut_at_budget") else ("  FAILED" if r.get("error") else "")
        print(f"{label:<22} {fmt(done, '>5')} {fmt(r.get('seconds'), '>9.2f')} {fmt(per_case, '>8.3f')} "
              f"{fmt(chp, '>9.1f')} {fmt(ratio, '>9.2f')}{cut}")
    b = records.get("bundle")
    if b and b.get("outputs"):
        print(f"bundle run: start-up {fmt(b.get('startup_seconds'), '.2f')} s (first output at "
              f"{fmt(b.get('first_output_seconds'), '.2f')} s), then {fmt(b.get('steady_seconds_per_case'), '.3f')} s "
              f"a case; exit {fmt(b['seconds'] - b.get('last_output_seconds', 0), '.2f')} s after the last output")
    p = records.get("profile")
    if p and p.get("median_seconds_per_case"):
        ph = p["startup_phases_seconds"]
        print(f"bundle profile ({p['device']}, amp {p['amp']}): interpreter {ph['interpreter_to_main']:.2f} s, imports "
              f"{ph['imports']:.2f} s, parse+initialize {ph['parse_and_initialize']:.2f} s, first batch "
              f"{fmt(p.get('first_data_wait_seconds'), '.2f')} s; a case (median): "
              + ", ".join(f"{k} {fmt(v, '.3f')}" for k, v in p["median_seconds_per_case"].items())
              + " s; postprocessing: "
              + ", ".join(f"{k.split(':', 1)[1]} {fmt(v, '.3f')}" for k, v in
                          p["median_postprocessing_seconds"].items()) + " s")
    s = records.get("segq")
    if s and s.get("steps"):
        steps = s["steps"]
        parts = [f"{n} {v['median_seconds']:.3f} s (total {v['total_seconds']:.1f})" for n, v in steps.items()]
        if "infer" in steps:
            parts.append(f"device-held infer {steps['infer']['median_device_seconds']:.3f} s")
        print("segq steps, median a case: " + ", ".join(parts))
        print(f"segq timeline: device busy (steady) {json.dumps(s.get('busy_fraction_steady'))}, overall "
              f"{json.dumps(s.get('busy_fraction_overall'))}; first mask {fmt(s.get('first_mask_seconds'), '.2f')} s; "
              f"queued->last mask {fmt(s.get('queued_to_mask_seconds'), '.2f')} s (submit itself "
              f"{fmt(s.get('submit_to_queued_seconds'), '.2f')} s); launcher ready "
              f"{fmt(s.get('launcher_ready_seconds'), '.1f')} s, warm-up {fmt(s.get('warmup_seconds'), '.1f')} s")
    a = summary.get("agreement")
    if a and a.get("cases_compared"):
        print(f"agreement ({a['cases_compared']}/{a['cases']} cases): voxels equal min {a['min_equal_fraction']:.5%} "
              f"({a['worst_case']}), Dice min " + ", ".join(f"label {k} {v:.5f}" for k, v in a["min_dice"].items())
              + f"; affines equal {a['affines_equal']}; spleen fraction (bundle) "
              f"{json.dumps(a['spleen_fraction_bundle'])}")
    if summary.get("ratio_cases_per_hour") is not None:
        print(f"segq / bundle cases/hour: {summary['ratio_cases_per_hour']:.2f}x (target {TARGET_RATIO:.0f}x: "
              f"{'met' if summary['meets_target_3x'] else 'NOT met'}; moonshot {MOONSHOT_RATIO:.0f}x: "
              f"{'met' if summary['meets_moonshot_5x'] else 'not met'}); without start-ups "
              f"{fmt(summary.get('ratio_steady'), '.2f')}x")
    if a and a.get("cases_compared"):
        print(f"agreement target (>= {TARGET_AGREEMENT:.1%} voxels, Dice >= {TARGET_DICE}): "
              f"{'met' if a['meets_target'] else 'NOT met'}")


def run(args: argparse.Namespace, root: Path) -> None:
    from bench.scale_gpus import gpu_names, redis_server

    budget = Budget(args.time_budget, args.timeout)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "bundle_dataset.jsonl" if args.out else None
    started = time.perf_counter()
    data, warm = root / "data", root / "warmup"
    cases = make_cases(data, args.cases, args.size, args.spacing, seed=1000)
    warmup = make_cases(warm, args.warmup * max(1, args.gpus) if "segq" in args.arms else 0, args.size,
                        args.spacing, seed=9000, prefix="w")
    calibration = make_cases(root / "calibration", 1, args.size, args.spacing, seed=99, prefix="cal")[0]
    made = time.perf_counter() - started
    bundle = root / "spleen_ct_segmentation"
    model = write_bundle(bundle, calibration, args.label_fraction)
    setting = {"bench": "bundle_dataset", "gpu_names": gpu_names() if args.gpus else [], "gpus": args.gpus,
               "cpus": os.cpu_count(), "size": list(args.size), "spacing": list(args.spacing), "cases": args.cases,
               "precision_segq": args.precision, "bundle_amp": True, **model,
               "made_cases_seconds": round(made, 2), "bundle_written_seconds": round(time.perf_counter() - started
                                                                                     - made, 2)}
    logger.info("made %d cases (+%d warm-up) in %.1f s; the bundle in %.1f s", len(cases), len(warmup), made,
                setting["bundle_written_seconds"])
    records: dict[str, dict[str, Any]] = {}

    def keep(record: dict[str, Any]) -> None:
        records[record["arm"]] = record
        emit({**setting, **{k: v for k, v in record.items() if k != "per_case"}},
             args.out / "bundle_dataset_arms.jsonl" if args.out else None)  # each arm as it ends

    for arm in args.arms:
        if budget.total is not None and budget.left(reserve=30) < 20:
            keep({"arm": arm, "skipped": "no time left in --time-budget"})
            continue
        try:
            if arm == "bundle":
                keep(bundle_arm(args, bundle, data, cases, root, budget))
            elif arm == "profile":
                keep(profile_arm(args, bundle, data, root, budget))
            else:
                with redis_server(args.redis_server, args.redis_port, args.broker, root) as broker:
                    keep(segq_arm(args, root, broker, bundle, warmup, cases, budget))
        except Exception as exc:  # one arm's failure is recorded; the others' figures still count
            logger.exception("arm %s failed", arm)
            keep({"arm": arm, "error": f"{type(exc).__name__}: {str(exc)[-3000:]}"})
    summary: dict[str, Any] = {"arm": "summary", **ratios(records)}
    if "bundle" in records and records.get("segq", {}).get("masks"):
        summary["agreement"] = agreement(cases, root / "bundle-out", Path(records["segq"]["masks"]))
    summary["run_seconds"] = round(time.perf_counter() - started, 1)
    for record in records.values():  # printed as each arm ended; here only written, with the others
        write_line({**setting, **record}, out)
    emit({**setting, **summary}, out)
    print_table(records, summary)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--profile-child"]:
        bundle, data, out, result, started = argv[1:6]
        profile_child(Path(bundle), Path(data), Path(out), Path(result), float(started))
        return
    # `timeout` ends a run with SIGTERM: raise SystemExit instead, so the cleanups (logs kept, the launcher, the
    # bundle's process and redis-server stopped) run.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    run_in_tempdir("segq-bundle-", run, parse_args(argv), logger)


if __name__ == "__main__":
    main()
