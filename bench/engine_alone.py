"""The engine alone, in one process on one GPU: what a segq part would take with no queue around it.

bench/scale_gpus.py runs it beside the queue arms, so "GPU busy" can be read against the engine's own
time for the same volume: a part that holds the device much longer than this is waiting on the host.

    python -m bench.engine_alone MODEL_TOML X Y Z OVERLAP PRECISION [COMPILE_MODE|off]  ->  one JSON line
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np


def main(model_toml: Path, shape: tuple[int, int, int], overlap: float, precision: str, compile_mode: str | None,
         repeats: int = 3) -> None:
    import torch

    from segq.pipeline.toml import load_model_spec
    from segq.settings import get_settings
    from segq.tiling import Slab, importance_map, pad_volume, plan_windows
    from worker.engines.inference import read_slab, slab_partial
    from worker.engines.torch_engine import TorchEngine

    spec = load_model_spec(model_toml).with_overrides(overlap=overlap)
    engine = TorchEngine(spec, torch.device("cuda:0"), precision, compile_mode, engine_root=get_settings().engine_root)
    volume = np.random.default_rng(0).standard_normal((1, *shape)).astype(np.float32)
    plan = plan_windows(shape, spec.roi, spec.overlap, spec.mode)
    padded = pad_volume(volume, plan)
    slab = Slab(0, list(plan.starts), 0, plan.padded_shape[0])
    weights = importance_map(plan)
    times = []
    for _ in range(repeats + 1):  # the first is cuDNN's autotuning (and the compile)
        torch.cuda.synchronize()
        started = time.perf_counter()
        slab_partial(read_slab(padded, slab, engine.device), slab, padded.shape[2:], plan.roi, weights, engine,
                     spec.sw_batch_size).cpu()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    best = min(times[1:])
    print(json.dumps({"arm": "engine alone", "shape": list(shape), "windows": len(plan.starts), "precision": precision,
                      "torch_compile": compile_mode or "off", "sw_batch_size": spec.sw_batch_size,
                      "seconds": round(best, 4),
                      "ms_per_window": round(best / len(plan.starts) * 1e3, 3)}))


if __name__ == "__main__":
    a = sys.argv[1:]
    mode = a[6] if len(a) > 6 and a[6] != "off" else None
    main(Path(a[0]), (int(a[1]), int(a[2]), int(a[3])), float(a[4]), a[5], mode)
