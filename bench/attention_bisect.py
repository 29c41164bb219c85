"""Which part of SwinUNETR does torch.compile compute differently? Eager against compiled, piece by piece.

Companion to bench/attention_check.py: SwinUNETR feature_size 48, ROI 96, fp16, random weights, the
window attention as segq's opaque operator. Pieces: the shifted-window mask (compute_mask) at every
stage's size, one plain and one shifted Swin block, the first stage, the whole Swin encoder. Each row
prints the largest and the mean absolute difference between eager and compiled outputs.

    python3 -m bench.attention_bisect --out $OUT/attention_bisect.jsonl
"""

from __future__ import annotations

import argparse
import copy
import logging
from pathlib import Path
from typing import Any

import torch
from monai.networks.nets.swin_unetr import compute_mask

from bench.attention_check import roi_batch
from bench.common import emit
from segq.modelspec import ModelSpec
from worker.engines.attention import use_opaque_attention
from worker.model import build_network


def diff(name: str, eager: Any, compiled: Any, out: Path | None) -> None:
    pairs = list(zip(eager, compiled, strict=True)) if isinstance(eager, (list, tuple)) else [(eager, compiled)]
    for i, (e, c) in enumerate(pairs):
        d = (e.float() - c.float()).abs()
        emit({"bench": "attention_bisect", "piece": f"{name}[{i}]" if len(pairs) > 1 else name,
              "max_abs_diff": float(d.max()), "mean_abs_diff": float(d.mean()),
              "mean_abs_value": float(e.float().abs().mean()), "shape": list(e.shape)}, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Tiny model on the CPU: checks the script.")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    device = torch.device("cpu" if args.quick else "cuda")
    dtype = torch.float32 if args.quick else torch.float16
    feature, roi = (12, 64) if args.quick else (48, 96)
    spec = ModelSpec("SwinUNETR", 1, 2, roi, 1, checkpoint=Path("unused"), feature_size=feature, sw_batch_size=8)
    torch.manual_seed(0)
    network = build_network(spec).eval().to(device=device, dtype=dtype)
    use_opaque_attention(network)
    x = roi_batch(spec, 2 if args.quick else 8, device).to(dtype)
    vit: Any = network.swinViT
    with torch.inference_mode():
        for size in (roi // 2, roi // 4, roi // 8, roi // 16):
            padded = -(-size // 7) * 7
            dims, window, shift = [padded] * 3, (7, 7, 7), (3, 3, 3)
            diff(f"compute_mask-{padded}", compute_mask(dims, window, shift, device),
                 torch.compile(compute_mask)(dims, window, shift, device), args.out)
        tokens = vit.pos_drop(vit.patch_embed(x))  # (b, c, d, h, w)
        channels_last = tokens.permute(0, 2, 3, 4, 1).contiguous()
        d = tokens.shape[2]
        padded = -(-d // 7) * 7
        mask = compute_mask([padded] * 3, (7, 7, 7), (3, 3, 3), device)
        for i, block in enumerate(vit.layers1[0].blocks):
            diff(f"block-{i}{'-shifted' if i % 2 else ''}", block(channels_last, mask),
                 torch.compile(copy.deepcopy(block))(channels_last, mask), args.out)
        diff("stage-1", vit.layers1[0](tokens), torch.compile(copy.deepcopy(vit.layers1[0]))(tokens), args.out)
        diff("swin-encoder", vit(x), torch.compile(copy.deepcopy(vit))(x), args.out)
        diff("whole-network", network(x), torch.compile(copy.deepcopy(network))(x), args.out)


if __name__ == "__main__":
    main()
