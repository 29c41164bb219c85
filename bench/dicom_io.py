"""Time the DICOM path on a CT-size series: submit's scan and hash, prepare's load, merge's SEG write.

    python3 -m bench.dicom_io --slices 300 --size 512

Writes a synthetic single-frame CT series (oblique, shuffled, int16 with rescale) to a temporary
directory, then times each step once after one untimed warm-up of the imports. CPU only. For scale,
it also times segq's NIfTI loader on the same voxels stored as an int16 .nii.gz.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()

    from segq.dicom import find_series, load_series, series_sha256
    from tests.dicom_helpers import oblique_affine, write_series
    from worker.dicomseg import SeriesMeta, write_seg

    shape = (args.size, args.size, args.slices)
    rng = np.random.default_rng(0)
    data = np.round(rng.normal(0, 200, shape)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files = write_series(root / "ct", data, oblique_affine(spacing=(0.7, 0.7, 1.0)), slope=1.0, intercept=-1024)
        find_series(files[:3])  # imports, untimed
        timings: dict[str, float] = {}
        started = time.perf_counter()
        [series], refused = find_series(files)
        timings["submit: read and check headers"] = time.perf_counter() - started
        assert not refused
        started = time.perf_counter()
        series_sha256(series.files)
        timings["submit: content hash"] = time.perf_counter() - started
        started = time.perf_counter()
        loaded = load_series(list(series.files))
        timings["prepare: decode to a volume"] = time.perf_counter() - started
        import nibabel as nib

        from segq.volumes import load_volume

        nifti = root / "same.nii.gz"
        nib.save(nib.Nifti1Image(data.astype(np.int16), loaded.affine), str(nifti))
        started = time.perf_counter()
        load_volume(nifti, 1, 10**10)
        timings["reference: the same volume as .nii.gz"] = time.perf_counter() - started
        grid = np.indices(shape[:2]).astype(np.float32)
        disc = ((grid[0] - args.size / 2) ** 2 + (grid[1] - args.size / 2) ** 2) < (args.size / 5) ** 2
        mask = np.zeros(shape, np.uint8, order="F")
        mask[:, :, args.slices // 4: 3 * args.slices // 4] = disc[:, :, None]
        meta = SeriesMeta([str(f) for f in series.files], loaded.affine.tolist(), loaded.lps_affine.tolist(),
                          loaded.frame_of_reference_uid, "both", ["tumour", "MorphologicallyAbnormalStructure",
                                                                  "Neoplasm"], ["segq bench", "0"])
        started = time.perf_counter()
        write_seg(np.asfortranarray(mask), meta, root / "bench_seg.dcm")  # merge passes NIfTI's (Fortran) order
        timings["merge: write the DICOM SEG"] = time.perf_counter() - started
        size = (root / "bench_seg.dcm").stat().st_size
    print(f"series {shape[0]}x{shape[1]}x{shape[2]} int16 CT, {len(files)} files; mask {int(mask.sum()):,} voxels")
    for name, seconds in timings.items():
        print(f"  {name:40s} {seconds:6.2f} s")
    print(f"  SEG file: {size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
