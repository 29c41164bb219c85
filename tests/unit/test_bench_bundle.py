"""bench/bundle_dataset.py's pure parts: its arguments, where each arm's label maps land, the agreement metric,
the bundle-run timing from output mtimes, the ratios, and the embedded Model Zoo files."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from bench import bundle_dataset as bd

# sha256 of models/spleen_ct_segmentation/configs/* at Project-MONAI/model-zoo dfae206df112837d817e78d3727c9f32b3b52e82
ZOO_SHA256 = {
    "inference.json": "c450895205c6a04cdd7eb511a8aa0ee144ecc36199a77a0da45b3bfd2cffb17f",
    "metadata.json": "f94bccd529751efff90e87304aa09525ea03825f591c0261cfba394fd1f38e83",
    "logging.conf": "f6e88ab39700a754dc09ae95be68d9fa2663611f0e5437b99c6d4afee4e81a0d",
}


def test_defaults_are_the_issue_s_run() -> None:
    args = bd.parse_args([])
    assert (args.cases, args.size, args.spacing, args.gpus) == (40, (512, 512, 110), (0.78, 0.78, 2.5), 1)
    assert args.arms == ["bundle", "segq"]
    assert args.precision == "fp16"  # like the bundle's amp on a GPU
    assert args.out is None and args.time_budget is None


def test_smoke_arguments() -> None:
    args = bd.parse_args(["--cases", "3", "--size", "64,64,24", "--gpus", "0", "--out", "/tmp/x"])
    assert (args.cases, args.size, args.gpus, args.out) == (3, (64, 64, 24), 0, Path("/tmp/x"))
    assert args.precision == "fp32"  # a CPU worker cannot run fp16


def test_arms_keep_the_run_order_and_refuse_unknown_names() -> None:
    assert bd.parse_args(["--arms", "profile,segq,bundle"]).arms == ["bundle", "segq", "profile"]
    assert bd.parse_args(["--arms", "segq"]).arms == ["segq"]
    with pytest.raises(SystemExit):
        bd.parse_args(["--arms", "bundle,peer"])


@pytest.mark.parametrize("argv", [["--size", "512,512"], ["--size", "512,0,110"], ["--size", "a,b,c"],
                                  ["--spacing", "0.78,0.78"], ["--spacing", "0,1,1"], ["--cases", "0"],
                                  ["--gpus", "0", "--precision", "fp16"]])
def test_bad_arguments_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        bd.parse_args(argv)


def test_size_and_spacing_parsers() -> None:
    assert bd.int_triple("512x512x110") == (512, 512, 110)
    assert bd.float_triple("0.78,0.78,2.5") == (0.78, 0.78, 2.5)
    assert bd.parse_args(["--precision", "fp32"]).precision == "fp32"


def test_output_paths() -> None:
    case = Path("/data/imagesTs/ct007.nii.gz")
    assert bd.case_stem(case) == "ct007"
    assert bd.case_stem(Path("a/b.nii")) == "b"
    # SaveImaged with the config's separate_folder true, output_postfix "trans", output_ext ".nii.gz"
    assert bd.bundle_output(Path("/o"), case) == Path("/o/ct007/ct007_trans.nii.gz")
    assert bd.segq_output(Path("/m"), case) == Path("/m/ct007_seg.nii.gz")
    config = json.loads(bd.INFERENCE_JSON)
    assert config["output_postfix"] == bd.OUTPUT_POSTFIX and config["separate_folder"] is True
    assert config["output_ext"] == ".nii.gz"


def test_agreement_on_known_maps() -> None:
    theirs = np.zeros((10, 10, 10), np.int16)
    theirs[:5] = 1  # 500 spleen voxels
    ours = theirs.copy()
    ours[5, 0, :4] = 1  # 4 voxels more
    result = bd.label_agreement(ours, theirs)
    assert result["equal_fraction"] == pytest.approx(996 / 1000)
    assert result["dice"]["1"] == pytest.approx(2 * 500 / (504 + 500))
    assert result["dice"]["0"] == pytest.approx(2 * 496 / (496 + 500))
    assert result["fraction"] == {"0": 0.5, "1": 0.5}
    same = bd.label_agreement(theirs, theirs)
    assert same["equal_fraction"] == 1.0 and same["dice"] == {"0": 1.0, "1": 1.0}


def test_a_label_neither_map_has_counts_as_agreeing() -> None:
    empty = np.zeros((4, 4, 4), np.int16)
    assert bd.label_agreement(empty, empty)["dice"] == {"0": 1.0, "1": 1.0}
    other = empty.copy()
    other[0, 0, 0] = 2  # a label outside LABELS is still scored
    assert bd.label_agreement(other, empty)["dice"]["2"] == 0.0


def test_maps_of_different_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="shapes"):
        bd.label_agreement(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)))


def test_summary_is_the_worst_case_and_the_target_needs_every_case() -> None:
    good = {"case": "a", "equal_fraction": 0.9995, "dice": {"0": 0.9999, "1": 0.9992}, "fraction": {"1": 0.1},
            "affine_equal": True}
    worse = {"case": "b", "equal_fraction": 0.9991, "dice": {"0": 0.9998, "1": 0.9995}, "fraction": {"1": 0.2},
             "affine_equal": True}
    summary = bd.summarise_agreement([good, worse], 2)
    assert summary["min_equal_fraction"] == 0.9991 and summary["worst_case"] == "b"
    assert summary["min_dice"] == {"0": 0.9998, "1": 0.9992}
    assert summary["meets_target"]
    assert not bd.summarise_agreement([good, worse], 3)["meets_target"]  # a case missing
    bad = {**worse, "dice": {"0": 0.9998, "1": 0.998}}
    assert not bd.summarise_agreement([good, bad], 2)["meets_target"]
    assert bd.summarise_agreement([], 2) == {"cases_compared": 0, "cases": 2}


def test_read_labels_rounds_saveimaged_float_maps(tmp_path: Path) -> None:
    import nibabel as nib

    labels = np.zeros((3, 4, 5, 1), np.float32)
    labels[1, 2, 3, 0] = 0.9999999
    nib.save(nib.Nifti1Image(labels, np.eye(4)), str(tmp_path / "x.nii.gz"))
    data, affine = bd.read_labels(tmp_path / "x.nii.gz")
    assert data.shape == (3, 4, 5) and data[1, 2, 3] == 1 and data.sum() == 1
    assert np.allclose(affine, np.eye(4))


def test_compare_case_reads_both_arms_outputs(tmp_path: Path) -> None:
    import nibabel as nib

    case = tmp_path / "imagesTs" / "ct000.nii.gz"
    theirs = np.zeros((6, 6, 6), np.float32)
    theirs[2:4] = 1
    affine = bd.case_affine((0.78, 0.78, 2.5), (6, 6, 6))
    out = bd.bundle_output(tmp_path / "b", case)
    out.parent.mkdir(parents=True)
    nib.save(nib.Nifti1Image(theirs, affine), str(out))
    (tmp_path / "m").mkdir()
    nib.save(nib.Nifti1Image(theirs.astype(np.uint8), affine), str(bd.segq_output(tmp_path / "m", case)))
    result = bd.agreement([case, tmp_path / "imagesTs" / "ct001.nii.gz"], tmp_path / "b", tmp_path / "m")
    assert result["cases_compared"] == 1 and result["cases"] == 2
    assert result["min_equal_fraction"] == 1.0 and result["affines_equal"]
    assert not result["meets_target"]  # ct001 has no outputs


def test_output_times_split_start_up_from_the_steady_rate(tmp_path: Path) -> None:
    start = 1_000_000.0
    paths = []
    for i, at in enumerate((20.0, 21.0, 22.0, 23.0)):
        path = tmp_path / f"o{i}"
        path.write_bytes(b"")
        os.utime(path, (start + at, start + at))
        paths.append(path)
    times = bd.output_times(start, [*paths, tmp_path / "missing"])
    assert times["outputs"] == 4
    assert times["first_output_seconds"] == 20.0 and times["last_output_seconds"] == 23.0
    assert times["steady_seconds_per_case"] == 1.0 and times["startup_seconds"] == 19.0
    assert bd.output_times(start, [tmp_path / "missing"]) == {"outputs": 0}


def test_ratios() -> None:
    records = {"bundle": {"cases_per_hour": 2000.0, "steady_seconds_per_case": 0.8},
               "segq": {"cases_per_hour": 7000.0, "queued_to_mask_seconds": 10.0, "cases_done": 40}}
    result = bd.ratios(records)
    assert result["ratio_cases_per_hour"] == 3.5 and result["meets_target_3x"] and not result["meets_moonshot_5x"]
    assert result["ratio_steady"] == pytest.approx(0.8 / 0.25)
    assert bd.ratios({"bundle": {"cases_per_hour": 1.0}}) == {}


def test_budget() -> None:
    assert bd.Budget(None, 1800).left(reserve=60) == 1800
    spent = bd.Budget(100.0, 1800, started=time.monotonic() - 200)
    assert spent.left() == 0.0
    fresh = bd.Budget(100.0, 1800)
    assert 30 < fresh.left(reserve=60) <= 40


def test_bundle_device_env(monkeypatch: pytest.MonkeyPatch) -> None:
    assert bd.bundle_device_env(0) == {"CUDA_VISIBLE_DEVICES": ""}
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert bd.bundle_device_env(4) == {"CUDA_VISIBLE_DEVICES": "0"}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert bd.bundle_device_env(2) == {"CUDA_VISIBLE_DEVICES": "3"}


def test_bundle_command_is_monai_s_own() -> None:
    argv = bd.bundle_command(Path("/b"), Path("/d"), Path("/o"))
    assert argv[1:] == ["-m", "monai.bundle", "run", "--config_file", "/b/configs/inference.json",
                        "--bundle_root", "/b", "--dataset_dir", "/d", "--output_dir", "/o"]


def test_embedded_files_are_the_zoo_s_verbatim() -> None:
    for name, text in (("inference.json", bd.INFERENCE_JSON), ("metadata.json", bd.METADATA_JSON),
                       ("logging.conf", bd.LOGGING_CONF)):
        assert hashlib.sha256(text.encode()).hexdigest() == ZOO_SHA256[name], name
    config = json.loads(bd.INFERENCE_JSON)
    assert config["datalist"] == "$list(sorted(glob.glob(@dataset_dir + '/imagesTs/*.nii.gz')))"
    assert config["evaluator"]["amp"] is True
    assert json.loads(bd.METADATA_JSON)["network_data_format"]["outputs"]["pred"]["channel_def"] == {
        "0": "background", "1": "spleen"}


def test_phantom_is_a_ct_with_a_spleen_in_the_window() -> None:
    volume = bd.phantom((48, 40, 20), seed=3)
    assert volume.dtype == np.int16 and volume.shape == (48, 40, 20)
    assert volume.min() >= -1024 and volume.max() > 400  # air and bone
    assert not np.array_equal(volume, bd.phantom((48, 40, 20), seed=4))  # each case is its own (segq dedups)
    assert np.array_equal(volume, bd.phantom((48, 40, 20), seed=3))
    in_window = np.count_nonzero((volume > -57) & (volume < 164))
    assert 0.1 < in_window / volume.size < 0.9
    affine = bd.case_affine((0.78, 0.78, 2.5), (48, 40, 20))
    assert np.allclose(np.diag(affine)[:3], [-0.78, -0.78, 2.5])  # LPS-stored: Orientationd(RAS) flips it
