"""Which part of SwinUNETR does torch.compile compute differently? Eager against compiled, piece by piece.

Companion to bench/attention_check.py: SwinUNETR feature_size 48, ROI 96, fp16, random weights, the
window attention as segq's opaque operator. Pieces: the first stage's two Swin blocks with
MONAI's mask built inside the graph, its patch-merging downsample, the whole first stage with the
mask built inside and outside the graph, and the whole network as segq's engine compiles it. Each row
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
from monai.networks.nets.swin_unetr import WindowAttention

from bench.attention_check import roi_batch
from bench.common import emit
from segq.modelspec import ModelSpec
from worker.engines.attention import OpaqueWindowAttention, use_opaque_attention
from worker.engines.model import build_network


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
    in_graph = copy.deepcopy(network)  # opaque attention, MONAI's mask built inside the graph
    for module in in_graph.modules():
        if type(module) is WindowAttention:
            module.__class__ = OpaqueWindowAttention
    use_opaque_attention(network)  # opaque attention, masks built eagerly (what segq's engine runs)
    x = roi_batch(spec, 2 if args.quick else 8, device).to(dtype)
    vit: Any = network.swinViT
    stage: Any = in_graph.swinViT.layers1[0]  # type: ignore[union-attr,index]
    with torch.inference_mode():
        tokens = vit.pos_drop(vit.patch_embed(x))  # (b, c, d, h, w)
        no_downsample = copy.deepcopy(stage)
        no_downsample.downsample = None
        blocks_out = no_downsample(tokens)
        diff("stage-1-blocks-in-graph-mask", blocks_out, torch.compile(copy.deepcopy(no_downsample))(tokens),
             args.out)
        merged_input = blocks_out.permute(0, 2, 3, 4, 1).contiguous()
        diff("stage-1-downsample", stage.downsample(merged_input),
             torch.compile(copy.deepcopy(stage.downsample))(merged_input), args.out)
        diff("stage-1-in-graph-mask", stage(tokens), torch.compile(copy.deepcopy(stage))(tokens), args.out)
        diff("stage-1-eager-mask", vit.layers1[0](tokens), torch.compile(copy.deepcopy(vit.layers1[0]))(tokens),
             args.out)
        diff("whole-network-eager-mask", network(x), torch.compile(copy.deepcopy(network))(x), args.out)

if __name__ == "__main__":
    main()
