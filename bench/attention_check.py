"""Where does an fp16 SwinUNETR lose agreement with fp32? Window attention kernels, eager and compiled.

One batch of ROIs cut from the BraTS-sized synthetic volume of bench/gpu_engines.py goes through
SwinUNETR (feature_size 48, ROI 96, random weights, seed 0) in fp32 (the reference) and in fp16:
eager with MONAI's attention, eager and torch.compile'd with the window attention as one opaque
operator, each under every SDPA kernel PyTorch offers for it. Each row prints the fraction of voxels
whose mask (probability >= 0.5) differs from the fp32 one, and the largest probability difference.
The opaque operator reads its kernel choice when it runs, so one compile serves every kernel.

    python3 -m bench.attention_check --out $OUT/attention_check.jsonl
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch.nn.attention import SDPBackend

from bench.common import emit
from bench.gpu_engines import synthetic_volume
from segq.modelspec import ModelSpec
from segq.tiling import pad_volume, plan_windows
from worker.engines.attention import attention_backends, use_opaque_attention
from worker.engines.model import TargetClassProbability, build_network
from worker.engines.torch_engine import use_fused_attention

logger = logging.getLogger("segq.bench.attention")

KERNELS: dict[str, list[SDPBackend] | None] = {
    "auto": None, "efficient": [SDPBackend.EFFICIENT_ATTENTION], "cudnn": [SDPBackend.CUDNN_ATTENTION],
    "math": [SDPBackend.MATH],
}


def roi_batch(spec: ModelSpec, batch: int, device: torch.device) -> torch.Tensor:
    volume = synthetic_volume((240, 240, 155))
    plan = plan_windows(volume.shape[1:], spec.roi, 0.5, spec.mode)
    padded = torch.from_numpy(pad_volume(volume, plan))
    rois = [padded[:, x:x + spec.roi[0], y:y + spec.roi[1], z:z + spec.roi[2]] for x, y, z in plan.starts[:batch]]
    return torch.stack(rois).to(device)


def compare(name: str, prob: torch.Tensor, reference: torch.Tensor, out: Path | None, **extra: Any) -> None:
    flipped = ((prob >= 0.5) != (reference >= 0.5)).float().mean().item()
    diff = (prob - reference).abs()
    emit({"bench": "attention_check", "arm": name, "flipped": round(flipped, 6), "agreement": round(1 - flipped, 6),
          "max_abs_diff": round(diff.max().item(), 5), "mean_abs_diff": round(diff.mean().item(), 6),
          "nan": int(torch.isnan(prob).sum().item()), **extra}, out)


def every_kernel(prefix: str, model: Any, x: torch.Tensor, reference: torch.Tensor, out: Path | None) -> None:
    """One row per SDPA kernel the opaque attention operator is restricted to (an error row if none fits)."""
    for kernel, backends in KERNELS.items():
        try:
            with attention_backends(backends):
                compare(f"{prefix}-{kernel}", model(x), reference, out)
        except RuntimeError as exc:
            emit({"bench": "attention_check", "arm": f"{prefix}-{kernel}", "error": str(exc)[:300]}, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--quick", action="store_true", help="Tiny model on the CPU: checks the script.")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    device = torch.device("cpu" if args.quick else "cuda")
    feature, roi = (12, 64) if args.quick else (48, 96)
    spec = ModelSpec("SwinUNETR", 1, 2, roi, 1, checkpoint=Path("unused"), feature_size=feature, sw_batch_size=8)
    torch.manual_seed(0)
    network = build_network(spec).eval().to(device)
    x = roi_batch(spec, args.batch, device)

    def wrapped(dtype: torch.dtype) -> TargetClassProbability:
        return TargetClassProbability(copy.deepcopy(network).to(dtype=dtype), 1, 2).eval()

    with torch.inference_mode():
        reference = wrapped(torch.float32)(x)
        half = x.to(torch.bfloat16 if args.quick else torch.float16)
        compare("eager-fp16-monai-attention", wrapped(half.dtype)(half), reference, args.out)
        fused = wrapped(half.dtype)
        use_fused_attention(fused)
        compare("eager-fp16-monai-fused", fused(half), reference, args.out)
        opaque = wrapped(half.dtype)
        use_opaque_attention(opaque)
        every_kernel("eager-fp16-opaque", opaque, half, reference, args.out)
        if args.no_compile:
            return
        started = time.perf_counter()
        compiled = torch.compile(opaque, dynamic=False)
        first = compiled(half)
        compile_s = time.perf_counter() - started
        compare("compiled-fp16-opaque-auto", first, reference, args.out, compile_seconds=round(compile_s, 1))
        compare("compiled-vs-eager-opaque-auto", first, opaque(half), args.out)
        every_kernel("compiled-fp16-opaque", compiled, half, reference, args.out)


if __name__ == "__main__":
    main()
