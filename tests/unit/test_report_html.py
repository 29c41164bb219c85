"""The results summary and the HTML report's pieces, on rows built in memory (no services)."""

from __future__ import annotations

import base64
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from producer.report import WorkerStats, _slice_index, build_html, overlay_png
from producer.results import summarize, summary_line
from segq.models import Dataset, Job, Status

T0 = datetime(2026, 1, 1, 22, 0, tzinfo=UTC)


def job(name: str, status: Status, start: float | None = None, end: float | None = None, **fields: object) -> Job:
    return Job(id=name, input_path=f"/scans/{name}.nii.gz", output_path=f"/out/{name}_seg.nii.gz", status=status,
               started_at=None if start is None else T0 + timedelta(seconds=start),
               finished_at=None if end is None else T0 + timedelta(seconds=end), **fields)


def night() -> list[Job]:
    return [
        job("a", Status.DONE, 0, 10, windows=8, tumour_ml=1.5, preprocess_seconds=1, inference_seconds=7,
            merge_seconds=1),
        job("b", Status.DONE, 5, 35, windows=16, tumour_ml=3.0, preprocess_seconds=2, inference_seconds=10,
            merge_seconds=3),
        job("c", Status.DONE, 30, 50, windows=8, tumour_ml=0.0, inference_seconds=5),
        job("d", Status.FAILED, 40, 41, error="NaN or infinite values"),
        job("e", Status.QUEUED),
    ]


def test_summary_counts_times_and_throughput() -> None:
    summary = summarize(night())
    assert summary["volumes"] == 5 and summary["done"] == 3 and summary["failed"] == 1 and summary["queued"] == 1
    assert summary["wall_seconds"] == 51  # first start (a's 1 s of preprocessing before it) to last end
    # each volume's own work, not its span (b's 30 s span holds 15 s of work and 15 s of waiting in the queue)
    assert summary["busy_seconds"] == 9 + 15 + 5 and summary["median_seconds"] == 9
    assert summary["windows"] == 32 and summary["windows_per_second"] == pytest.approx(32 / 51, abs=0.01)
    assert summary["volumes_per_hour"] == pytest.approx(3 / 51 * 3600, abs=0.01)
    line = summary_line(summary)
    assert line.startswith("summary: 5 volumes (3 done, 1 failed, 0 cancelled, 1 unfinished)")
    assert "median 9 s/volume" in line and "0.63 windows/s" in line


def test_summary_of_nothing_done() -> None:
    summary = summarize([job("e", Status.QUEUED)])
    assert summary["median_seconds"] is None and summary["windows_per_second"] is None
    assert "n/a" in summary_line(summary)


def test_slice_index_is_the_middle_of_the_mask_or_of_the_volume() -> None:
    mask = np.zeros((4, 4, 10), np.uint8)
    assert _slice_index(mask) == 5
    mask[1, 1, 6:9] = 1
    assert _slice_index(mask) == 7


def test_overlay_is_a_png(tmp_path: Path) -> None:
    image = np.random.default_rng(0).normal(size=(24, 20, 12)).astype(np.float32)
    mask = np.zeros(image.shape, np.uint8)
    mask[5:10, 5:10, 3:6] = 1
    nib.save(nib.Nifti1Image(image, np.eye(4)), str(tmp_path / "in.nii.gz"))
    nib.save(nib.Nifti1Image(mask, np.eye(4)), str(tmp_path / "seg.nii.gz"))
    uri = overlay_png(tmp_path / "in.nii.gz", tmp_path / "seg.nii.gz")
    assert uri.startswith("data:image/png;base64,")
    assert base64.b64decode(uri.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"


def test_page_is_self_contained_with_table_plots_and_images() -> None:
    jobs = night()
    dataset = Dataset(id="ds1", name="night <1>", out_dir="/out", model_path="/m.toml", model_sha256="f" * 64,
                      params={}, jobs=jobs)
    pixel = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n").decode()
    page = build_html([dataset], [WorkerStats("gpu0@box", 3, 32, 8.0)], {"a": pixel, "b": None})
    assert page.startswith("<!DOCTYPE html>") and "night &lt;1&gt;" in page and "<1>" not in page
    assert len(re.findall(r"<tr><td>", page)) == len(jobs)
    assert "NaN or infinite values" in page and 'id="summary"' in page
    assert page.count('<figure class="volume">') == 2 and "image unavailable" in page
    sources = re.findall(r'src="([^"]+)"', page)
    assert len(sources) == 3 + 1 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r'(href|src)="(https?:)?//', page), "nothing may be loaded from elsewhere"
