"""`segq submit`'s own start-up, on the way to a waited-for volume's prepare (issue 23, item 2): what it skips stays
right (the schema head read from the migration files, not Alembic), its timings are sound, and the latency
benchmark's arithmetic is right."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT


def test_the_schema_head_read_from_the_files_is_alembics(tmp_path: Path) -> None:
    from alembic.script import ScriptDirectory

    from segq import db

    heads = ScriptDirectory.from_config(db.alembic_config(f"sqlite:///{tmp_path / 'x.db'}")).get_heads()
    assert [db.migration_head()] == heads


def test_a_current_schema_is_checked_without_alembic(tmp_path: Path) -> None:
    """What `segq submit` checks of the database before its first prepare message, on a database at the head."""
    from segq import db

    url = f"sqlite:///{tmp_path / 'segq.db'}"
    db.upgrade(url)
    code = (f"import sys\nfrom segq import db\nassert db.schema_is_current({url!r})\n"
            "print(','.join(sorted(m for m in ('alembic', 'torch') if m in sys.modules)))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert result.stdout.strip() == "", f"imported {result.stdout.strip()}"


def test_timings_count_from_the_process_start() -> None:
    from producer.timings import Timings, process_age

    age = process_age()
    assert age is not None and 0 < age < 3600
    marks = Timings()
    marks.mark("first")
    marks.mark("first")  # the first time counts
    marks.span("hash a.nii.gz", 0.5, 1.5)
    marks.span("hash b.nii.gz", 0.7, 2.0)
    found = json.loads(marks.line().removeprefix("timings "))
    assert found["first_s"] >= age - 1 and found["hash_started_s"] == 0.5 and found["hash_seconds"] == 1.5


def test_latency_ratios_and_speedups() -> None:
    from bench import latency

    def run(submit: float, row: float, sent: float) -> dict[str, object]:
        return {"submit_to_mask_seconds": submit, "job_row_to_mask_seconds": row, "submit": {"prepare_sent_s": sent}}

    one = latency.summary([run(99, 99, 9), run(5.0, 4.5, 0.5), run(5.2, 4.6, 0.6), run(5.4, 4.7, 0.7)], 4.0, 1)
    assert one["submit_to_mask_seconds"] == 5.2 and one["submit_to_mask_x_engine"] == 1.3
    assert one["meets_1_gpu_target"] and one["submit_to_first_prepare_seconds"] == 0.6
    four = latency.summary([run(2.0, 1.5, 0.5), run(1.6, 1.2, 0.5)], 4.0, 4)
    records = [one, four]
    latency.add_speedups(records)
    assert four["speedup_submit_to_mask_vs_1_gpu"] == 3.25 and four["meets_4_gpu_target"]
    assert "4 GPU(s): submit to mask 1.60 s" in latency.describe(four)
    assert latency.submit_timings('x\ntimings {"a_s": 1.0, "spans": {}}\n') == {"a_s": 1.0}


def test_a_checkpoint_hash_is_remembered_until_the_file_changes(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from segq import modelspec

    weights, cache = tmp_path / "model.pt", tmp_path / "cache" / "checkpoint-sha256.json"
    weights.write_bytes(b"a" * 4096)
    hashed: list[Path] = []
    real = modelspec.file_sha256
    monkeypatch.setattr(modelspec, "file_sha256", lambda path: hashed.append(path) or real(path))
    first = modelspec.file_sha256_cached(weights, cache)
    assert modelspec.file_sha256_cached(weights, cache) == first == real(weights)
    assert len(hashed) == 1  # the second call read the cache
    weights.write_bytes(b"b" * 4096)  # same size, new bytes: ctime and mtime move
    assert modelspec.file_sha256_cached(weights, cache) == real(weights) != first
    assert len(hashed) == 2
    cache.write_text("{not json")  # a broken cache is ignored, and replaced
    assert modelspec.file_sha256_cached(weights, cache) == real(weights)
    assert len(hashed) == 3 and modelspec.file_sha256_cached(weights, cache) == real(weights) and len(hashed) == 3
