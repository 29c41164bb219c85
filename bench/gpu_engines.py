"""Engines side by side on a GPU: MONAI's sliding_window_inference (fp32) against segq's engines.

Volumes: 240x240x155 at overlap 0.5 (BraTS-sized) and 512x512x300 at overlap 0.25 (CT-sized),
SwinUNETR feature_size 48, ROI 96, random weights, gaussian blending, structured synthetic intensities.

  baseline   monai.inferers.sliding_window_inference, bare network in fp32, sw_batch_size 8, the
             volume moved to the GPU inside the timing; softmax + threshold on the GPU; mask to host.
  engine     segq's slab loop (worker.engines.inference.infer_slab over every window as one slab) with an
             engine from worker.engines (torch fp32/fp16/bf16, ROI batch 8/16/32); importance-weight
             division and threshold on the GPU; mask to host. Timed from the padded host array.
  queue      the whole queue path (bench/gpu_queue.py): redis-server, a real `segq worker`, `segq submit`
             of a .nii file; seconds from the job's queued_at to finished_at in the database.

Each arm prints seconds per volume (median of --repeats after one warm-up), windows/s, achieved
TFLOP/s (FLOPs of one ROI forward counted by torch.utils.flop_counter, x windows), the ratio to the
baseline, and the mask's agreement with the baseline's mask (fraction of equal voxels, Dice).

  python -m bench.gpu_engines --out $OUT/gpu_engines.jsonl            # the full run
  python -m bench.gpu_engines --quick --device cpu                     # a CPU check of the script
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from bench.common import QUICK_VOLUMES, VOLUMES, emit
from segq.modelspec import ModelSpec
from segq.tiling import Slab, importance_map, pad_volume, plan_windows
from worker.engines.gate import compare_masks
from worker.engines.inference import read_slab, slab_partial
from worker.engines.model import TargetClassProbability, build_network
from worker.engines.torch_engine import TorchEngine

logger = logging.getLogger("segq.bench")


def synthetic_volume(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """(1, X, Y, Z) float32: a smooth random field (upsampled 12^3 noise) plus fine noise, zero mean, unit std."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, 1, 12, 12, 12, generator=generator)
    field = torch.nn.functional.interpolate(coarse, size=shape, mode="trilinear", align_corners=False)[0]
    field += 0.3 * torch.randn(field.shape, generator=generator)
    field = (field - field.mean()) / field.std()
    return field.numpy().astype(np.float32)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], np.ndarray], device: torch.device, repeats: int) -> tuple[list[float], np.ndarray, float]:
    """One warm-up call (autotuning, allocator, compilation), then ``repeats`` timed calls.

    Returns the timed seconds, the last result and the warm-up's seconds."""
    sync(device)
    started = time.perf_counter()
    result = fn()
    sync(device)
    warmup = time.perf_counter() - started
    seconds = []
    for _ in range(repeats):
        sync(device)
        started = time.perf_counter()
        result = fn()
        sync(device)
        seconds.append(time.perf_counter() - started)
    return seconds, result, warmup


def roi_gflop(network: torch.nn.Module, spec: ModelSpec, device: torch.device) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, spec.in_channels, *spec.roi, device=device)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        network(x)
    return counter.get_total_flops() / 1e9


def baseline_mask(network: torch.nn.Module, volume: np.ndarray, spec: ModelSpec, overlap: float,
                  device: torch.device, autocast: bool = False) -> np.ndarray:
    from monai.inferers import sliding_window_inference

    with torch.inference_mode(), torch.autocast(device.type, torch.float16, enabled=autocast):
        x = torch.from_numpy(volume)[None].to(device, next(network.parameters()).dtype)
        logits = cast(torch.Tensor, sliding_window_inference(x, spec.roi, spec.sw_batch_size, network,
                                                             overlap=overlap, mode=spec.mode))
        prob = torch.softmax(logits.float(), dim=1)[0, spec.target_class]
        return (prob >= 0.5).cpu().numpy()


def engine_mask(engine: Any, padded: np.ndarray, plan: Any, weights: np.ndarray, batch: int) -> np.ndarray:
    """segq's slab loop over every window, then division by the summed weights and threshold on the device."""
    device = engine.device
    slab = Slab(0, list(plan.starts), 0, plan.padded_shape[0])
    total = slab_partial(read_slab(padded, slab, device), slab, padded.shape[2:], plan.roi, weights, engine, batch)
    w = torch.from_numpy(weights).to(device)
    norm = torch.zeros_like(total)
    rx, ry, rz = plan.roi
    for x, y, z in plan.starts:
        norm[x : x + rx, y : y + ry, z : z + rz].add_(w)
    return (total / norm >= 0.5)[plan.crop].cpu().numpy()


class Recorder:
    """Emits one JSON line per arm with the derived figures, relative to the volume's baseline."""

    def __init__(self, out: Path | None, common: dict[str, Any], gflop: float) -> None:
        self.out, self.common, self.gflop = out, common, gflop
        self.baseline: dict[str, float] = {}
        self.masks: dict[str, np.ndarray] = {}
        self.best_peer: dict[str, float] = {}

    def record(self, volume: str, windows: int, arm: str, seconds: list[float], mask: np.ndarray | None,
               **extra: Any) -> dict[str, Any]:
        median = statistics.median(seconds)
        if arm == "baseline":
            self.baseline[volume] = median
            self.masks[volume] = mask  # type: ignore[assignment]
        row: dict[str, Any] = {**self.common, "volume": volume, "windows": windows, "arm": arm,
                               "seconds": round(median, 4), "seconds_all": [round(s, 4) for s in seconds],
                               "windows_per_s": round(windows / median, 2),
                               "tflops": round(windows * self.gflop / 1e3 / median, 2), **extra}
        if volume in self.baseline:
            row["speedup"] = round(self.baseline[volume] / median, 3)
        if extra.get("peer") or arm == "baseline":
            self.best_peer[volume] = min(self.best_peer.get(volume, median), median)
        elif volume in self.best_peer:
            row["vs_best_peer"] = round(self.best_peer[volume] / median, 3)
        if mask is not None and volume in self.masks:
            agreement = compare_masks(self.masks[volume], mask)
            row["agreement"] = round(agreement.agreement, 6)
            row["dice"] = round(agreement.dice, 6)
        emit(row, self.out)
        return row

    def record_error(self, arm: str, error: str) -> None:
        emit({**self.common, "arm": arm, "error": error}, self.out)


ARMS: list[dict[str, Any]] = [
    {"precision": "fp32", "batch": 8}, {"precision": "fp16", "batch": 8}, {"precision": "bf16", "batch": 8},
    {"precision": "fp16", "batch": 16},
    # ablation: MONAI's unfused window attention and cuDNN's default algorithm choice
    {"precision": "fp16", "batch": 8, "fused_attention": False, "cudnn_benchmark": False, "label": "plain"},
]
# Measured slower in the smoke run (bench/results/gpu_engines_smoke.jsonl): opt in with --extra-arms.
EXTRA_ARMS: list[dict[str, Any]] = [
    {"precision": "fp16", "batch": 32}, {"precision": "fp16", "batch": 8, "channels_last": True},
]
COMPILE_ARMS: dict[str, dict[str, Any]] = {
    # MONAI's fused window attention inside the graph, inductor's comprehensive padding off (compile_options)
    "default": {"precision": "fp16", "batch": 16, "compile": True},
    # the same replayed as CUDA graphs (launch overhead gone)
    "cudagraphs": {"precision": "fp16", "batch": 16, "compile": True, "compile_mode": "reduce-overhead",
                   "label": "cudagraphs"},
    # inductor benchmarks kernel choices (matmul and convolution templates) while compiling: far longer compile
    "autotune": {"precision": "fp16", "batch": 16, "compile": True, "compile_mode": "max-autotune-no-cudagraphs",
                 "label": "autotune"},
}
# The peers: MONAI's sliding_window_inference as a user would tune it (issue 12's table), each timed from the
# host volume to the host mask like the baseline. The baseline (fp32, sw 8) is the first of them.
PEER_ARMS: dict[str, dict[str, Any]] = {
    "monai-autocast-fp16-sw8": {"autocast": True, "batch": 8},
    "monai-autocast-fp16-flash-cudnn-sw16": {"autocast": True, "flash": True, "cudnn_benchmark": True, "batch": 16},
    "monai-half-flash-cudnn-sw16": {"half": True, "flash": True, "cudnn_benchmark": True, "batch": 16},
}


def engine_arms(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    arms = ARMS + (EXTRA_ARMS if args.extra_arms else [])
    if args.arms:
        arms = [a for a in arms if arm_name(a) in args.arms]
    if device.type == "cpu":
        arms = [a for a in arms if a["precision"] != "fp16"]
    return arms


def arm_name(arm: dict[str, Any]) -> str:
    parts = [f"torch-{arm['precision']}", f"b{arm['batch']}"]
    parts += [k for k in ("channels_last", "compile") if arm.get(k)]
    if arm.get("label"):
        parts.append(arm["label"])
    return "-".join(parts)


def make_engine(spec: ModelSpec, network: torch.nn.Module, device: torch.device, arm: dict[str, Any]) -> TorchEngine:
    import copy

    wrapped = TargetClassProbability(copy.deepcopy(network), spec.target_class, spec.out_channels).eval()
    spec = spec.with_overrides(sw_batch_size=arm["batch"])  # a compiled engine's one batch size
    mode = arm.get("compile_mode", "default") if arm.get("compile") else None
    return TorchEngine(spec, device, arm["precision"], mode, fused_attention=arm.get("fused_attention"),
                       cudnn_benchmark=arm.get("cudnn_benchmark"), channels_last=bool(arm.get("channels_last")),
                       model=wrapped)


def prepare(name: str, volumes: dict[str, Any], spec: ModelSpec) -> dict[str, Any]:
    shape, overlap = volumes[name]
    volume = synthetic_volume(shape)
    plan = plan_windows(shape, spec.roi, overlap, spec.mode)
    return {"name": name, "volume": volume, "overlap": overlap, "plan": plan, "windows": len(plan.starts),
            "padded": pad_volume(volume, plan), "weights": importance_map(plan)}


def run_baseline(v: dict[str, Any], spec: ModelSpec, network: torch.nn.Module, args: argparse.Namespace,
                 device: torch.device, rec: Recorder) -> None:
    torch.backends.cudnn.benchmark = False  # MONAI's (and PyTorch's) default
    vspec = spec.with_overrides(overlap=v["overlap"])
    seconds, mask, warmup = timed(lambda: baseline_mask(network, v["volume"], vspec, v["overlap"], device), device,
                                  args.repeats)
    rec.record(v["name"], v["windows"], "baseline", seconds, mask, precision="fp32", batch=spec.sw_batch_size,
               path="monai.sliding_window_inference", warmup_seconds=round(warmup, 2))


def run_peers(v: dict[str, Any], spec: ModelSpec, network: torch.nn.Module, args: argparse.Namespace,
              device: torch.device, rec: Recorder) -> None:
    """The tuned MONAI loops of PEER_ARMS on this volume, after the fp32 baseline."""
    import copy

    from worker.engines.torch_engine import use_fused_attention

    for name, arm in PEER_ARMS.items():
        peer = copy.deepcopy(network)
        if arm.get("flash"):
            use_fused_attention(peer)
        if arm.get("half"):
            peer.half()
        torch.backends.cudnn.benchmark = bool(arm.get("cudnn_benchmark"))
        vspec = spec.with_overrides(overlap=v["overlap"], sw_batch_size=arm["batch"])
        autocast = bool(arm.get("autocast"))
        seconds, mask, warmup = timed(lambda p=peer, s=vspec, a=autocast: baseline_mask(  # type: ignore[misc]
            p, v["volume"], s, v["overlap"], device, autocast=a), device, args.repeats)
        rec.record(v["name"], v["windows"], name, seconds, mask, precision="fp16", batch=arm["batch"],
                   path="monai.sliding_window_inference", peer=True, warmup_seconds=round(warmup, 2))
        del peer
        torch.backends.cudnn.benchmark = False
        torch.cuda.empty_cache()


def run_arms(v: dict[str, Any], arms: list[dict[str, Any]], spec: ModelSpec, network: torch.nn.Module,
             args: argparse.Namespace, device: torch.device, rec: Recorder) -> None:
    for arm in arms:
        started = time.perf_counter()
        try:
            engine = make_engine(spec, network, device, arm)
            load_s = time.perf_counter() - started
            seconds, mask, warmup = timed(
                lambda e=engine, b=arm["batch"]: engine_mask(e, v["padded"], v["plan"], v["weights"], b),  # type: ignore[misc]
                device, args.repeats)
        except Exception as exc:  # one arm's failure must not lose the others' figures
            logger.exception("arm %s failed", arm_name(arm))
            rec.record_error(arm_name(arm), f"{type(exc).__name__}: {exc}")
            continue
        rec.record(v["name"], v["windows"], arm_name(arm), seconds, mask, precision=arm["precision"],
                   batch=arm["batch"], path="engine", load_seconds=round(load_s, 1), warmup_seconds=round(warmup, 2))
        del engine
        torch.backends.cudnn.benchmark = False
        if device.type == "cuda":
            torch.cuda.empty_cache()


def profile_batch(spec: ModelSpec, network: torch.nn.Module, device: torch.device, precision: str = "fp16",
                  batch: int = 8) -> str:
    """The CUDA kernels of one ROI batch through the engine, heaviest first: where the time goes."""
    from torch.profiler import ProfilerActivity, profile

    engine = make_engine(spec, network, device, {"precision": precision, "batch": batch})
    x = torch.randn(batch, spec.in_channels, *spec.roi, device=device)
    for _ in range(2):
        engine(x)
    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        engine(x)
        sync(device)
    table: str = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Tiny model and volumes: checks the script on a CPU.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--volumes", nargs="*", default=list(VOLUMES), choices=list(VOLUMES))
    parser.add_argument("--compile", nargs="*", default=[], choices=list(COMPILE_ARMS),
                        help="torch.compile fp16 arms to add, run last (each compiles for minutes).")
    parser.add_argument("--peers", action="store_true", help="Also the tuned MONAI loops (PEER_ARMS), run first.")
    parser.add_argument("--extra-arms", action="store_true", help="Also the arms the smoke run found slower.")
    parser.add_argument("--arms", nargs="*", default=None,
                        help="Only these eager arms, by name (torch-fp16-b16, torch-fp32-b8, ...).")
    parser.add_argument("--no-engine", action="store_true", help="Only the baseline (and the queue path).")
    parser.add_argument("--queue", action="store_true", help="Also run the whole queue path (bench/gpu_queue.py).")
    parser.add_argument("--queue-precisions", nargs="*", default=["fp32", "fp16"])
    parser.add_argument("--queue-batch", type=int, default=16)
    parser.add_argument("--queue-repeats", type=int, default=None, help="Default: --repeats.")
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/2")
    parser.add_argument("--onnxruntime", action="store_true", help="Time one ROI in ONNX Runtime (CPU provider).")
    parser.add_argument("--profile", action="store_true", help="Log the heaviest CUDA kernels of an fp16 batch.")
    parser.add_argument("--out", type=Path, default=None, help="Append JSON lines here.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    device = torch.device(args.device)
    feature, roi = (12, 64) if args.quick else (48, 96)
    spec = ModelSpec("SwinUNETR", 1, 2, roi, 1, checkpoint=Path("unused"), feature_size=feature, sw_batch_size=8)
    torch.manual_seed(0)
    network = build_network(spec).eval().to(device)
    gflop = roi_gflop(network, spec, device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    common = {"bench": "gpu_engines", "device": gpu, "torch": torch.__version__, "roi": roi, "feature_size": feature,
              "roi_gflop": round(gflop, 1), "repeats": args.repeats}
    emit({**common, "event": "start"}, args.out)
    rec = Recorder(args.out, common, gflop)
    if args.profile and device.type == "cuda":
        logger.info("heaviest CUDA kernels, torch fp16, batch 8:\n%s", profile_batch(spec, network, device))
        torch.backends.cudnn.benchmark = False
    volumes = QUICK_VOLUMES if args.quick else VOLUMES
    # Order: what matters most first, the minutes-long compile last, so a time limit only loses the tail.
    for name in args.volumes:
        v = prepare(name, volumes, spec)
        run_baseline(v, spec, network, args, device, rec)
        if args.peers and device.type == "cuda":
            run_peers(v, spec, network, args, device, rec)
        run_arms(v, [] if args.no_engine else engine_arms(args, device), spec, network, args, device, rec)
    if args.onnxruntime:
        from bench.gpu_queue import onnxruntime_roi

        emit({**common, **onnxruntime_roi(spec, network)}, args.out)
    if args.queue:
        from bench.gpu_queue import run_queue

        run_queue(args, spec, network, {n: volumes[n] for n in args.volumes}, rec, synthetic_volume, device)
    for variant in args.compile:
        for name in args.volumes:
            run_arms(prepare(name, volumes, spec), [COMPILE_ARMS[variant]], spec, network, args, device, rec)


if __name__ == "__main__":
    main()
