"""A worker's engine start, cold and from the cache: `segq warm-engine` run again and again on one machine.

Each start is a fresh process, as a worker start is: imports, CUDA, the network built from its checkpoint, the
compile (or inductor's on-disk cache under SEGQ_ENGINE_DIR), and the accuracy gate against fp32 eager.
For each ``--torch-compile`` mode the engine directory starts empty, so the first start is the cold one (what
`segq warm-engine` pays once per machine) and the later ones are what every worker start then costs.

    python -m bench.warm_start --torch-compile off,default,aot --starts 3 --out "$OUT"

JSON lines go to <out>/warm_start.jsonl: each start's process wall time and the engine's own "ready in" time.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import ROOT, emit, run_in_tempdir
from bench.throughput import add_network_arguments, network_model

logger = logging.getLogger("segq.bench.warm_start")
READY = re.compile(r"ready in ([0-9.]+) s")


def start(model: Path, mode: str, engines: Path, precision: str, log: Path) -> dict[str, Any]:
    """One `segq warm-engine` process: its wall time and the engine's "ready in"."""
    env = {**os.environ, "SEGQ_ENGINE_DIR": str(engines), "SEGQ_PRECISION": precision, "SEGQ_TORCH_COMPILE": mode,
           "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0")}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)  # the engine sets it under SEGQ_ENGINE_DIR, as in a worker
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "segq.cli", "warm-engine", "-m", str(model)], env=env, cwd=ROOT,
                          capture_output=True, text=True)
    wall = time.perf_counter() - started
    log.write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise SystemExit(f"segq warm-engine ({mode}) failed with {done.returncode}; see {log}")
    ready = READY.findall(done.stdout)
    return {"process_seconds": round(wall, 2), "engine_ready_seconds": float(ready[-1]) if ready else None}


def run(args: argparse.Namespace, root: Path) -> None:
    from segq.pipeline.toml import load_model_spec

    args.out.mkdir(parents=True, exist_ok=True)
    model = network_model(args, root)
    spec = load_model_spec(model)  # --model's network, or the one built from the options
    for mode in args.torch_compile:
        engines = (args.engine_dir or root) / f"engines-{mode}"  # empty: the first start is this machine's first
        if engines.exists() and any(engines.iterdir()):
            raise SystemExit(f"{engines} is not empty: the first start would not be a cold one")
        for number in range(args.starts):
            figures = start(model, mode, engines, args.precision, args.out / f"warm-start-{mode}-{number}.log")
            record = {"bench": "warm_start", "arch": spec.arch, "feature_size": spec.feature_size,
                      "roi": spec.roi_size, "sw_batch_size": spec.sw_batch_size, "precision": args.precision,
                      "torch_compile": mode,
                      "start": number, "cache": "cold" if number == 0 else "warm", **figures}
            emit(record, args.out / "warm_start.jsonl")
            print(f"{mode:>6} start {number} ({record['cache']}): process {figures['process_seconds']:6.1f} s, "
                  f"engine ready in {figures['engine_ready_seconds']} s", flush=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_network_arguments(parser, "SwinUNETR", 48, 96, 16)
    parser.add_argument("--precision", default="fp16", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--torch-compile", default="off,auto", type=lambda text: text.split(","),
                        help="SEGQ_TORCH_COMPILE values, comma-separated; each gets an empty engine directory.")
    parser.add_argument("--starts", type=int, default=3, help="Starts per mode; the first is the cold one.")
    parser.add_argument("--model", type=Path, default=None, help="A model.toml to use instead of a random network.")
    parser.add_argument("--engine-dir", type=Path, default=None,
                        help="Keep each mode's engine directory here (engines-<mode>), e.g. for bench.engine_alone "
                             "after; default: a temporary directory.")
    parser.add_argument("--out", type=Path, required=True, help="Directory for warm_start.jsonl and the start logs.")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    run_in_tempdir("segq-warm-", run, parse_args(argv), logger)


if __name__ == "__main__":
    main()
