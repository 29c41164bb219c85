"""Cases of several files through `segq submit` and a real worker: nnU-Net names and datalists queue one job a
case, bad cases are refused one line each while the rest completes, and the mask is the stacked volume's."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from sqlalchemy import select

from segq.db import session_scope
from segq.models import Dataset, Job, Status, Subtask
from segq.modelspec import files_sha256
from tests.conftest import Stack
from tests.helpers import reference_probability, write_model
from tests.integration.test_pipeline import assert_matches_reference, segq

pytestmark = pytest.mark.integration

SHAPE = (40, 36, 20)
SPACING = (0.9, 1.1, 2.0)


def grid(shift: float = 0.0) -> np.ndarray:
    affine = np.diag([*SPACING, 1.0])
    affine[:3, 3] = (-20.0 + shift, 10.0, 5.0)
    return affine


def write_channels(directory: Path, case: str, numbers: range | list[int] = range(4), suffix: str = ".nii.gz",
                   seed: int = 0) -> list[Path]:
    """One file per channel, each on its own scale (z-scored per channel at prepare), so order shows."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for n in numbers:
        data = (rng.normal(size=SHAPE) * (n + 1) + 10 * n).astype(np.float32)
        path = directory / f"{case}_{n:04d}{suffix}"
        nib.save(nib.Nifti1Image(data, grid()), str(path))
        paths.append(path)
    return paths


def rewrite(path: Path, shape: tuple[int, ...] = SHAPE, affine: np.ndarray | None = None) -> None:
    data = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    nib.save(nib.Nifti1Image(data, grid() if affine is None else affine), str(path))


def stacked(paths: list[Path], target: Path) -> Path:
    """The same channels as one 4D file, channels last: what segq ran before cases of several files."""
    data = np.stack([np.asarray(nib.load(str(p)).dataobj) for p in paths], axis=-1)
    nib.save(nib.Nifti1Image(data, grid()), str(target))
    return target


def jobs_of(name: str) -> dict[str, Job]:
    with session_scope() as s:
        jobs = s.scalars(select(Job).join(Dataset).where(Dataset.name == name))
        return {Path(job.output_path).name.removesuffix("_seg.nii.gz"): job for job in jobs}


def refusals(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("refused ")]


def test_cases_of_several_files(fresh_stack: Stack, models_dir: Path, tmp_path: Path) -> None:
    model = write_model(models_dir / "unet-4ch", "UNet", roi=32, feature_size=4, in_channels=4, preprocess="zscore")
    scans, other, lists = tmp_path / "scans", tmp_path / "other", tmp_path / "lists"
    good = write_channels(scans, "BRATS_001", seed=1)
    mirrored = write_channels(scans / "sub", "BRATS_002", suffix=".nii", seed=2)
    write_channels(scans, "BRATS_003", [0, 1, 3])
    write_channels(scans, "BRATS_004", range(5))
    rewrite(write_channels(scans, "BRATS_005")[1], affine=grid(shift=0.5))
    rewrite(write_channels(scans, "BRATS_006")[3], shape=(40, 36, 21))
    rewrite(write_channels(scans, "BRATS_007")[2], shape=(*SHAPE, 2))
    modalities = ("t1", "t1ce", "t2", "flair")  # BraTS' names: a datalist says which file is which channel
    listed = [p.rename(other / f"{m}.nii.gz") for p, m in zip(write_channels(other, "P9", seed=9), modalities,
                                                                  strict=True)]
    lists.mkdir()
    (lists / "cases.json").write_text(json.dumps({
        "training": [{"image": "../other/t1.nii.gz", "label": "../other/none.nii.gz"}],
        "testing": [{"image": [f"../other/{m}.nii.gz" for m in modalities], "name": "P9"},
                    {"image": ["../other/t1.nii.gz", "../other/gone.nii.gz", "../other/t2.nii.gz",
                               "../other/flair.nii.gz"], "name": "P10"}]}))
    out = tmp_path / "masks"
    fresh_stack.worker("w1")
    first = segq("submit", str(scans), "--datalist", str(lists / "cases.json"), "--out", str(out), "--model",
                 str(model), "--name", "cases", "--save-probabilities", "--wait", "--timeout", "240",
                 env=fresh_stack.env, check=False)
    assert first.returncode == 1 and first.stdout.count("done    ") == 3, first.stdout + first.stderr
    assert "datalist " in first.stderr and "read its 'testing' list (2 case(s))" in first.stderr
    lines = refusals(first.stderr)
    expected = {
        "BRATS_003": f"channel file {scans}/BRATS_003_0002.nii.gz is missing",
        "BRATS_004": f"{scans}/BRATS_004_0004.nii.gz is one channel too many",
        "BRATS_005": f"{scans.resolve()}/BRATS_005_0001.nii.gz differs from BRATS_005_0000.nii.gz in its affine "
                     "(origin (-19.5, 10, 5) mm against (-20, 10, 5))",
        "BRATS_006": f"{scans.resolve()}/BRATS_006_0003.nii.gz has shape (40, 36, 21) and BRATS_006_0000.nii.gz "
                     "(40, 36, 20)",
        "BRATS_007": f"{scans.resolve()}/BRATS_007_0002.nii.gz holds 2 channels",
        "P10": f"{lists}/../other/gone.nii.gz does not exist",
    }
    assert len(lines) == len(expected), "\n".join(lines)
    for case, reason in expected.items():
        assert sum(line.startswith(f"refused case {case} (") and reason in line for line in lines) == 1, (case, lines)

    jobs = jobs_of("cases")
    assert set(jobs) == {"BRATS_001", "BRATS_002", "P9"}
    for case, files in {"BRATS_001": good, "BRATS_002": mirrored, "P9": listed}.items():
        job = jobs[case]
        resolved = [p.resolve() for p in files]
        assert job.status == Status.DONE, job.error
        assert job.channel_files == [str(p) for p in resolved] and job.input_path == str(resolved[0])
        assert job.input_sha256 == files_sha256(resolved)
    assert jobs["BRATS_002"].output_path == str((out / "sub" / "BRATS_002_seg.nii.gz").resolve())

    # The mask is what MONAI's sliding window gives on the four channels stacked into one volume.
    mask = out / "BRATS_001_seg.nii.gz"
    assert nib.load(str(mask)).shape == SHAPE and np.allclose(nib.load(str(mask)).affine, grid())
    reference = reference_probability(stacked(good, tmp_path / "BRATS_001_stacked.nii.gz"), model)
    assert_matches_reference(out / "BRATS_001_prob.nii.gz", mask, reference)

    # Submitting again redoes nothing; the refused cases are refused again.
    again = segq("submit", str(scans), "--datalist", str(lists / "cases.json"), "--out", str(out), "--model",
                 str(model), "--name", "cases", "--save-probabilities", env=fresh_stack.env)
    assert "queued 0 volume(s), 3 already done, 6 refused (same dataset as before)" in again.stdout, again.stdout

    # A CSV naming BRATS_001's files is the same case (its mask is copied); a row lacking a file is refused alone.
    rows = ["case,t1,t1ce,t2,flair", ",".join(["again", *(f"../scans/{p.name}" for p in good)]),
            f"lost,../scans/{good[0].name},,x.nii.gz,y.nii.gz"]
    (lists / "cases.csv").write_text("\n".join(rows) + "\n")
    csv_out = tmp_path / "masks-csv"
    third = segq("submit", "--datalist", str(lists / "cases.csv"), "--out", str(csv_out), "--model", str(model),
                 "--name", "cases-csv", "--save-probabilities", env=fresh_stack.env)
    assert "queued 0 volume(s), 1 already done, 1 refused" in third.stdout, third.stdout + third.stderr
    assert refusals(third.stderr) == ["refused case lost (cases.csv line 3): no file in column t1ce: give every "
                                      "channel"]
    assert (csv_out / "again_seg.nii.gz").read_bytes() == mask.read_bytes()
    assert jobs_of("cases-csv")["again"].fingerprint == jobs["BRATS_001"].fingerprint
    attempts = {case: job.attempt for case, job in jobs_of("cases").items()}
    assert attempts == {case: job.attempt for case, job in jobs.items()}, "a resubmission runs nothing again"
    with session_scope() as s:
        assert not s.scalars(select(Subtask).join(Job).join(Dataset).where(Dataset.name == "cases-csv")).all()

    # The channels' order is part of the case's identity: the same files in another order are new work.
    (lists / "swapped.csv").write_text("case,image_1,image_0,image_2,image_3\nswapped," + ",".join(
        f"../scans/{good[i].name}" for i in (0, 2, 1, 3)) + "\n")
    fourth = segq("submit", "--datalist", str(lists / "swapped.csv"), "--out", str(tmp_path / "masks-swapped"),
                  "--model", str(model), "--name", "swapped", "--save-probabilities", "--wait", "--timeout", "240",
                  env=fresh_stack.env)
    assert "queued 1 volume(s), 0 already done" in fourth.stdout, fourth.stdout + fourth.stderr
    swapped = jobs_of("swapped")["swapped"]
    assert swapped.status == Status.DONE and swapped.channel_files == [str(good[i].resolve()) for i in (2, 0, 1, 3)]
    assert swapped.input_sha256 != jobs["BRATS_001"].input_sha256

    # Status and results name a case by its name; evaluate finds its truth by it (nnU-Net's labelsTs/BRATS_001).
    status = segq("status", "cases", env={**fresh_stack.env, "COLUMNS": "250"}).stdout
    assert "BRATS_001 (4 files)" in status and "P9 (4 files)" in status and "_0000.nii" not in status, status
    shown = json.loads(segq("results", "cases", "--format", "json", "--no-summary", env=fresh_stack.env).stdout)
    by_case = {row["case"]: row for row in shown}
    assert set(by_case) == {"BRATS_001", "BRATS_002", "P9"}
    assert by_case["BRATS_001"]["input"] == str(good[0].resolve())
    assert by_case["BRATS_001"]["channel_files"] == [str(p.resolve()) for p in good]
    truth = tmp_path / "labelsTs"
    truth.mkdir()
    (truth / "BRATS_001.nii.gz").write_bytes(mask.read_bytes())
    scored = segq("evaluate", "cases", "--truth", str(truth), env=fresh_stack.env).stdout
    assert "mean Dice 1.0000 over 1 volume(s)" in scored, scored
    assert jobs_of("cases")["BRATS_001"].dice == 1.0 and jobs_of("cases")["P9"].dice is None
