"""The peer a user would run instead of segq: the folder split over one process per GPU, each a tuned MONAI loop.

Each process loads its share of the .nii.gz files in turn, runs MONAI's ``sliding_window_inference``
tuned as a user would tune it (``model.half()``, MONAI's fused window attention, ``cudnn.benchmark``,
sw_batch_size 16), thresholds the softmax on the GPU and saves the mask .nii.gz. It is timed after one
warm-up volume (cuDNN's autotuning), as shared/peers/peer_folder.py measured it. bench/scale_gpus.py
runs it on the same files and GPUs as segq, in the same run.

    python -m bench.peer_folder DIR NGPUS OUT  ->  one JSON line with cases/hour
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import ROOT


def _make_volume(path: Path, shape: tuple[int, int, int], seed: int, dtype: str) -> Path:
    import nibabel as nib
    import torch

    rng = np.random.default_rng(seed)
    small = rng.standard_normal([s // 8 + 1 for s in shape]).astype(np.float32)
    smooth = torch.nn.functional.interpolate(torch.from_numpy(small)[None, None], size=shape, mode="trilinear")
    volume = (smooth[0, 0] + 0.3 * torch.randn(shape, generator=torch.Generator().manual_seed(seed))).numpy()
    if dtype == "int16":  # a CT as scanners store it: Hounsfield-like integers
        volume = np.clip(volume * 400, -1024, 3000).astype(np.int16)
    nib.save(nib.Nifti1Image(volume, np.diag([1.0, 1.0, 1.0, 1.0])), str(path))
    return path


def make_volumes(directory: Path, count: int, shape: tuple[int, int, int], seed: int = 1,
                 dtype: str = "float32", prefix: str = "v") -> list[Path]:
    """``count`` smooth random volumes as .nii.gz, as the peer script makes them (they compress like scans),
    written by several processes at once (gzip is single-threaded)."""
    from concurrent.futures import ProcessPoolExecutor

    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"{prefix}{i:03d}.nii.gz" for i in range(count)]
    with ProcessPoolExecutor(max_workers=max(1, min(count, (os.cpu_count() or 1) // 2))) as pool:
        return list(pool.map(_make_volume, paths, [shape] * count, [seed + i for i in range(count)],
                             [dtype] * count))


def child(directory: Path, k: int, n: int, out: Path, feature_size: int, roi: int, sw_batch_size: int,
          overlap: float) -> None:
    import nibabel as nib
    import torch
    from monai.inferers import sliding_window_inference
    from monai.networks.nets import SwinUNETR

    torch.manual_seed(0)
    net = SwinUNETR(in_channels=1, out_channels=2, feature_size=feature_size, spatial_dims=3).cuda().eval().half()
    for module in net.modules():
        if hasattr(module, "use_flash_attention") and hasattr(module, "relative_position_bias_table"):
            module.use_flash_attention = True
    torch.backends.cudnn.benchmark = True
    files = sorted(p for p in os.listdir(directory) if p.endswith(".nii.gz"))[k::n]

    def one(name: str) -> None:
        image = nib.load(str(directory / name))
        x = torch.from_numpy(np.asarray(image.dataobj, dtype=np.float32)).cuda()[None, None].half()
        with torch.inference_mode():
            y = sliding_window_inference(x, (roi,) * 3, sw_batch_size, net, overlap=overlap, mode="gaussian")
            mask = (torch.softmax(y.float(), 1)[0, 1] > 0.5).to(torch.uint8).cpu().numpy()
        nib.save(nib.Nifti1Image(mask, image.affine), str(out / name.replace(".nii.gz", "_seg.nii.gz")))

    one(files[0])  # warm-up (cudnn autotune)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for name in files:
        one(name)
    print(json.dumps({"k": k, "volumes": len(files), "seconds": time.perf_counter() - started}), flush=True)


def run(directory: Path, gpus: int, out: Path, feature_size: int = 48, roi: int = 96, sw_batch_size: int = 16,
        overlap: float = 0.5) -> dict[str, Any]:
    """The folder split over ``gpus`` processes (GPU k takes every gpus-th file); cases/hour over the slowest."""
    out.mkdir(parents=True, exist_ok=True)
    procs = [subprocess.Popen([sys.executable, "-m", "bench.peer_folder", "child", str(directory), str(k), str(gpus),
                               str(out), str(feature_size), str(roi), str(sw_batch_size), str(overlap)],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT,
                              env={**os.environ, "CUDA_VISIBLE_DEVICES": str(k)}) for k in range(gpus)]
    results = []
    for proc in procs:
        stdout, _ = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"a peer process failed with exit code {proc.returncode}:\n{stdout[-3000:]}")
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    volumes = sum(r["volumes"] for r in results)
    wall = max(r["seconds"] for r in results)
    return {"arm": "peer folder split", "gpus": gpus, "volumes": volumes, "seconds": round(wall, 3),
            "cases_per_hour": round(volumes / wall * 3600, 1)}


if __name__ == "__main__":
    if sys.argv[1] == "child":
        a = sys.argv[2:]
        child(Path(a[0]), int(a[1]), int(a[2]), Path(a[3]), int(a[4]), int(a[5]), int(a[6]), float(a[7]))
    else:
        print(json.dumps(run(Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))))
