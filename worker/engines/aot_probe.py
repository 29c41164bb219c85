"""Load a saved compiled network as a worker would and run it once on zeros, in a process of its own.

``python -m worker.engines.aot_probe PATH SPEC_JSON DEVICE PRECISION``: run by ``aot.probe`` before a worker
loads a new file in its own process, so a loader that crashes (SIGSEGV) kills this process, not the worker.
An entry point only: no module imports it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from segq.modelspec import spec_from_dict
from worker.engines import aot
from worker.engines.torch_engine import DTYPES, prepared_network


def main(argv: list[str]) -> None:
    path, spec = Path(argv[0]), spec_from_dict(json.loads(argv[1]))
    device, dtype = torch.device(argv[2]), DTYPES[argv[3]]
    runner = aot.load(path, lambda: prepared_network(spec, device, dtype))
    with torch.inference_mode():
        runner(torch.zeros((spec.sw_batch_size, spec.in_channels, *spec.roi), device=device, dtype=dtype))


if __name__ == "__main__":
    main(sys.argv[1:])
