"""How fast a CT-size .nii.gz inflates on this host, and what the rest of a load costs: the floor of prepare's load.

A volume someone waits for cannot reach a GPU before its gzip stream is inflated and its z-score statistics are
known (they need every voxel). This times, on bench/peer_folder.py's CT (int16, 512x512x300 by default):

- **isal**: ISA-L's igzip in one thread (what segq.volumes reads with);
- **rapidgzip** in 1..N threads, where it is installed (a parallel inflater of ordinary single-member gzip);
- **load_volume**: segq.volumes.load_volume whole (header, bomb check, inflate, float32, finite check);
- **stats**: worker.inputrows.zscore_stats on the loaded volume, in torch's threads.

Each is the median of ``--repeats`` runs after one warm-up; ratios are against ISA-L in one thread.

    python -m bench.decode --out bench/results
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench import peer_folder
from bench.common import emit, run_in_tempdir


def timed(body: Callable[[], Any], repeats: int) -> float:
    body()
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        body()
        runs.append(time.perf_counter() - started)
    return round(statistics.median(runs), 4)


def inflaters(path: Path, threads: Sequence[int]) -> dict[str, Callable[[], Any]]:
    from isal import igzip

    def isal() -> int:
        with igzip.open(path, "rb") as stream:
            return len(stream.read())

    found: dict[str, Callable[[], Any]] = {"isal": isal}
    try:
        import rapidgzip
    except ImportError:
        return found
    for n in threads:
        def parallel(n: int = n) -> int:
            with rapidgzip.open(str(path), parallelization=n) as stream:
                return len(stream.read())
        found[f"rapidgzip x{n}"] = parallel
    return found


def run(args: argparse.Namespace, root: Path) -> None:
    import numpy as np
    import torch

    from segq.volumes import load_volume
    from worker.inputrows import zscore_stats

    path = peer_folder.make_volumes(root / "ct", 1, tuple(args.shape), seed=7, dtype="int16", prefix="ct")[0]
    cores = os.cpu_count() or 1
    threads = sorted({n for n in (1, 4, 8, cores) if n <= cores})
    record: dict[str, Any] = {"bench": "decode", "shape": list(args.shape), "cores": cores,
                              "gz_bytes": path.stat().st_size, "torch_threads": torch.get_num_threads()}
    seconds = {name: timed(body, args.repeats) for name, body in inflaters(path, threads).items()}
    volume = load_volume(path, 1, 1 << 31)[0]
    seconds["load_volume"] = timed(lambda: load_volume(path, 1, 1 << 31), args.repeats)
    zyx = torch.from_numpy(np.ascontiguousarray(volume.transpose(0, 3, 2, 1), dtype=np.float32))
    seconds["stats"] = timed(lambda: zscore_stats(zyx), args.repeats)
    record["seconds"] = seconds
    record["x_isal"] = {name: round(seconds["isal"] / s, 2) for name, s in seconds.items() if "gzip" in name}
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    emit(record, args.out / "decode.jsonl" if args.out else None)
    for name, s in seconds.items():
        print(f"{name:>16}: {s:.3f} s" + (f"  ({record['x_isal'][name]:.2f}x ISA-L)" if name in record["x_isal"]
                                          else ""))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(512, 512, 300))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, help="Directory for decode.jsonl.")
    import logging

    run_in_tempdir("segq-decode-", run, parser.parse_args(argv), logging.getLogger("bench.decode"))


if __name__ == "__main__":
    main()
