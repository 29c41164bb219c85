"""Which AOTInductor packages load on this machine: each build and each load in a process of its own.

A diagnostic for SEGQ_TORCH_COMPILE=aot: on the H200 machine (PyTorch 2.11+cu130) a SwinUNETR package built
and then crashed its process (SIGSEGV) when loaded. This builds small packages in fresh processes and loads
them in fresh processes, with Python's faulthandler on, and prints one JSON line per step with its exit code.

    python -m bench.aot_load_check --out "$OUT"
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import subprocess
import sys
import time
from pathlib import Path

STEP = """
import faulthandler, sys, torch
faulthandler.enable()
from pathlib import Path
from segq.pipeline.toml import load_model_spec
from worker.engines.torch_engine import TorchEngine, prepared_network
what, toml, precision, root = sys.argv[1:5]
spec = load_model_spec(toml)
device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
if what == "bare-load":
    from worker.engines import aot
    path = next(Path(root).rglob("*.pt2"))
    dtype = torch.float16 if precision == "fp16" else torch.float32
    runner = aot.load(path, lambda: prepared_network(spec, device, dtype))
    x = torch.zeros((spec.sw_batch_size, spec.in_channels, *spec.roi), device=device, dtype=dtype)
    print(runner(x).shape)
else:
    engine = TorchEngine(spec, device, precision, compile_mode="aot", engine_root=Path(root))
    x = torch.randn((spec.sw_batch_size + 1, spec.in_channels, *spec.roi), device=device)
    eager = TorchEngine(spec, device, precision)
    print("max diff", (engine(x) - eager(x)).abs().max().item())
"""


def main() -> None:
    from bench.throughput import make_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--nets", default="UNet:4:32,SwinUNETR:12:64")
    parser.add_argument("--precision", default="fp16")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    faulthandler.enable()
    for net in args.nets.split(","):
        arch, feature_size, roi = net.split(":")
        root = args.out / "work" / arch
        toml = make_model(root / "model", arch, int(feature_size), int(roi), 2)
        for what in ("build", "load", "bare-load"):
            started = time.perf_counter()
            done = subprocess.run([sys.executable, "-c", STEP, what, str(toml), args.precision, str(root / "engines")],
                                  capture_output=True, text=True, timeout=300)
            tail = [line for line in (done.stdout + done.stderr).splitlines() if "Warning" not in line][-25:]
            print(json.dumps({"net": net, "step": what, "rc": done.returncode,
                              "seconds": round(time.perf_counter() - started, 1), "tail": tail}), flush=True)


if __name__ == "__main__":
    main()
