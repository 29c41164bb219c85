"""Which inductor setting makes torch.compile of SwinUNETR's fused window attention wrong? (issue 12)

SwinUNETR feature_size 48, ROI 96, fp16, random weights, MONAI's fused window attention
(``use_flash_attention``). Eager outputs of pieces of the network are compared with the same pieces
compiled under several settings, one at a time:

  inductor                   torch.compile's defaults
  aot_eager                  the same captured graph run by eager kernels (tells dynamo/AOT from inductor)
  emulate_precision_casts    inductor rounds fp16 intermediates as eager does
  no_comprehensive_padding   inductor keeps strides unpadded
  no_shape_padding           inductor does not pad matmul shapes
  no_layout_optimization     inductor keeps the layouts it is given
  no_pattern_matcher         inductor's graph rewrites (attention fusion among them) off

Pieces: the shifted Swin block of the first stage on its own, the whole first stage, and the whole
Swin encoder. A piece is wrong when it has NaNs or differs from eager by much more than aot_eager does.
Each row: largest and mean absolute difference, NaN count, mean magnitude, compile seconds.

    python3 -m bench.compile_check --out $OUT/compile_check.jsonl
    python3 -m bench.compile_check --quick            # a CPU check of the script
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from monai.networks.nets.swin_unetr import compute_mask, get_window_size

from bench.common import emit
from bench.gpu_engines import synthetic_volume
from segq.modelspec import ModelSpec
from segq.tiling import pad_volume, plan_windows
from worker.engines.model import build_network
from worker.engines.torch_engine import use_fused_attention

VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "inductor": ("inductor", {}),
    "aot_eager": ("aot_eager", {}),
    "emulate_precision_casts": ("inductor", {"emulate_precision_casts": True}),
    "no_comprehensive_padding": ("inductor", {"comprehensive_padding": False}),
    "no_shape_padding": ("inductor", {"shape_padding": False}),
    "no_layout_optimization": ("inductor", {"layout_optimization": False}),
    "no_pattern_matcher": ("inductor", {"pattern_matcher": False}),
}


@contextlib.contextmanager
def inductor_settings(settings: dict[str, Any]) -> Iterator[None]:
    import torch._inductor.config as config

    with config.patch(settings) if settings else contextlib.nullcontext():
        yield


def roi_batch(spec: ModelSpec, batch: int, device: torch.device) -> torch.Tensor:
    """The first ``batch`` windows of the BraTS-size synthetic volume, as one batch on ``device``."""
    volume = synthetic_volume((240, 240, 155))
    plan = plan_windows(volume.shape[1:], spec.roi, 0.5, spec.mode)
    padded = torch.from_numpy(pad_volume(volume, plan))
    rois = [padded[:, x:x + spec.roi[0], y:y + spec.roi[1], z:z + spec.roi[2]] for x, y, z in plan.starts[:batch]]
    return torch.stack(rois).to(device)


def compiled_run(module: torch.nn.Module, args: tuple[Any, ...], variant: str) -> tuple[Any, float]:
    """``module`` compiled under ``variant`` and run once on ``args``: (output, seconds incl. compile)."""
    backend, settings = VARIANTS[variant]
    torch._dynamo.reset()
    started = time.perf_counter()
    with inductor_settings(settings):
        out = torch.compile(copy.deepcopy(module), backend=backend, dynamic=False)(*args)
    return out, time.perf_counter() - started


def difference(eager: Any, compiled: Any) -> dict[str, Any]:
    pairs = list(zip(eager, compiled, strict=True)) if isinstance(eager, (list, tuple)) else [(eager, compiled)]
    rows = []
    for e, c in pairs:
        d = (e.float() - c.float()).abs()
        rows.append({"max_abs_diff": float(d.nan_to_num(float("inf")).max()), "mean_abs_diff": float(d.nanmean()),
                     "nan": int(torch.isnan(c).sum()), "mean_abs_value": float(e.float().abs().mean())})
    worst = max(rows, key=lambda r: (r["nan"], r["mean_abs_diff"] / max(r["mean_abs_value"], 1e-12)))
    relative = worst["mean_abs_diff"] / max(worst["mean_abs_value"], 1e-12)
    return {**worst, "outputs": len(rows), "relative_mean_diff": relative}


def pieces(network: torch.nn.Module, x: torch.Tensor) -> dict[str, tuple[torch.nn.Module, tuple[Any, ...]]]:
    """The first stage's shifted block with its eager input and mask, the first stage, the Swin encoder."""
    vit: Any = network.swinViT
    stage: Any = vit.layers1[0]
    tokens = vit.pos_drop(vit.patch_embed(x))
    block_in = stage.blocks[0](tokens.permute(0, 2, 3, 4, 1).contiguous(), None)
    _, d, h, w, _ = block_in.shape
    window, shift = get_window_size((d, h, w), stage.window_size, stage.shift_size)
    padded = [math.ceil(size / win) * win for size, win in zip((d, h, w), window, strict=True)]
    mask = compute_mask(padded, window, shift, x.device)
    return {"shifted-block": (stage.blocks[1], (block_in, mask)), "stage-1": (stage, (tokens,)),
            "swin-encoder": (vit, (x,))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Tiny model on the CPU in fp32: checks the script.")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--budget", type=float, default=420.0, help="Stop starting compiles after this many seconds.")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    device = torch.device("cpu" if args.quick else "cuda")
    dtype = torch.float32 if args.quick else torch.float16
    feature, roi = (12, 64) if args.quick else (48, 96)
    spec = ModelSpec("SwinUNETR", 1, 2, roi, 1, checkpoint=Path("unused"), feature_size=feature, sw_batch_size=8)
    torch.manual_seed(0)
    network = build_network(spec).eval()
    use_fused_attention(network)
    network.to(device=device, dtype=dtype)
    started = time.perf_counter()
    common = {"bench": "compile_check", "torch": torch.__version__, "dtype": str(dtype).removeprefix("torch."),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "batch": args.batch}
    with torch.inference_mode():
        x = roi_batch(spec, args.batch, device).to(dtype)
        for piece, (module, inputs) in pieces(network, x).items():
            eager = module(*inputs)
            for variant in args.variants:
                if time.perf_counter() - started > args.budget:
                    emit({**common, "piece": piece, "variant": variant, "skipped": "time budget"}, args.out)
                    continue
                try:
                    out, seconds = compiled_run(module, inputs, variant)
                except Exception as exc:  # one variant's failure must not lose the others
                    emit({**common, "piece": piece, "variant": variant, "error": f"{type(exc).__name__}: {exc}"[:500]},
                         args.out)
                    continue
                emit({**common, "piece": piece, "variant": variant, "seconds": round(seconds, 1),
                      **difference(eager, out)}, args.out)


if __name__ == "__main__":
    main()
