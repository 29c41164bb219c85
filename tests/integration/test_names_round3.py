"""Issue 24, items 3, 7 and 11, end to end: a real dataset's file names go through `segq submit`, a worker and the
merge; names that could act on a terminal or pass the filesystem's limit are all refused at once, before
anything is queued; and every command prints the names as text.

The pure checks are unit-tested in tests/unit/test_names_round3.py.
"""

from __future__ import annotations

import csv
import html
import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from segq.db import session_scope
from segq.models import Job
from segq.storage import filesystem_limits, temp_name
from tests.helpers import write_volume
from tests.reliability import Deployment, assert_nothing_lost, deployment, figure

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SMALL = (40, 36, 32)  # one slab
MARKUP_NAME = "[link=http://evil.example]night[/link]"  # a dataset name rich would render as a live link


@pytest.fixture
def dep(tmp_path: Path) -> Iterator[Deployment]:
    with deployment(tmp_path) as d:
        yield d


def _real_names(out: Path) -> list[str]:
    """Names from real datasets, and the longest whose outputs (probabilities' temp name included) still fit."""
    longest = filesystem_limits(out)[0] - len(temp_name(Path("_prob.nii.gz")).name)
    return ["Patient 001.nii.gz", "M\u00fcller_T1.nii.gz", "Stra\u00dfe 2/\u60a3\u8005 001.nii.gz",
            "[link=evil.example]x[red].nii.gz", "scan*[1] -rf;.nii.gz", "a" * longest + ".nii.gz"]


def _refusal(dep: Deployment, *args: str) -> str:
    result = dep.segq("submit", *args)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.stderr


def test_real_names_are_segmented_and_shown_as_text(dep: Deployment, unet_model: Path, tmp_path: Path) -> None:
    scans, bad, out = tmp_path / "scans", tmp_path / "bad", tmp_path / "out"
    names = _real_names(tmp_path)
    for seed, name in enumerate(names):
        write_volume(scans / name, SMALL, seed=seed)
    hostile = ["a\x1b[2J.nii.gz", "b\x07.nii.gz", "c" * 233 + ".nii.gz"]  # 240 characters: fails at merge, if let in
    for seed, name in enumerate([*hostile, "fine.nii.gz"]):
        write_volume(bad / name, SMALL, seed=seed)
    model = ("--model", str(unet_model))

    stderr = _refusal(dep, str(bad), "--out", str(out), *model)
    lines = stderr.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Error: "))
    listed = [line.strip() for line in lines[start + 1:]]
    assert lines[start].startswith("Error: 3 input name(s) cannot be written under") and "\x1b" not in stderr, stderr
    assert [line.split(": ", 1)[0] for line in listed] == [f"{bad}/a\\x1b[2J.nii.gz", f"{bad}/b\\x07.nii.gz",
                                                          f"{bad}/{'c' * 233}.nii.gz"], stderr
    assert "holds control characters (\\x1b)" in listed[0] and "is too long" in listed[2], stderr
    stderr = _refusal(dep, str(scans), "--out", str(out), *model, "--name", "night\x1b[2J\x1b[31m")
    assert "holds control characters (\\x1b): terminals act on them" in stderr and "\x1b" not in stderr, stderr
    with session_scope() as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 0
    assert dep.redis.pending() == {}

    dep.worker("w1")
    result = dep.segq("submit", str(scans), "--out", str(out), *model, "--name", MARKUP_NAME,
                      "--save-probabilities", "--wait", timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    rows = assert_nothing_lost(dep, unet_model, done={Path(name).name for name in names})
    assert {Path(r.output_path).relative_to(out.resolve()) for r in rows} == {
        Path(name.removesuffix(".nii.gz") + "_seg.nii.gz") for name in names}
    assert all(Path(r.output_path.replace("_seg.nii.gz", "_prob.nii.gz")).is_file() for r in rows)

    status = dep.segq("status").stdout
    assert MARKUP_NAME in status and "[link=evil.example]x[red].nii.gz" in status and "\x1b" not in status, status
    [dataset_id] = {r.dataset_id for r in rows}
    shown = list(csv.DictReader(io.StringIO(dep.segq("results", dataset_id, "--format", "csv").stdout)))
    assert sorted(Path(row["input"]).name for row in shown) == sorted(Path(name).name for name in names)
    assert json.loads(dep.segq("results", MARKUP_NAME, "--format", "json").stdout)[0]["dataset"] == dataset_id
    page = tmp_path / "report.html"
    assert dep.segq("report", dataset_id, "-o", str(page), "--max-images", "0").returncode == 0
    assert html.escape(MARKUP_NAME) in page.read_text() and html.escape("[link=evil.example]x[red]") in page.read_text()
    figure("24.3 real names", f"{len(names)} names done (longest {len(names[-1])} characters), 3 bad names refused "
           "in one error, --name with ESC refused; 0 rows, 0 messages at refusal")
