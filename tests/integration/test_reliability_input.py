"""Hostile input end to end (issue 6, scenarios 12-14): paths, NIfTI files, messages and checkpoints.

The producer's refusals are unit-tested (tests/unit/test_paths.py, tests/unit/test_hostile_*.py); here
real workers meet what a careless or hostile producer let through, and each test ends with the
nothing-lost check of tests/reliability.py.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import pickle
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from sqlalchemy import func, select, update

from segq.db import session_scope
from segq.models import Dataset, Job
from tests.helpers import write_model, write_volume
from tests.reliability import Deployment, assert_nothing_lost, deployment, figure, peak_rss_mb, wait_for
from tests.unit.test_hostile_nifti import claim_shape, nifti_bytes

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SMALL = (40, 36, 32)  # one slab


@pytest.fixture
def dep(tmp_path: Path) -> Iterator[Deployment]:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    with deployment(tmp_path, SEGQ_ALLOWED_ROOTS=str(allowed)) as d:
        yield d


def _received(log: str, task: str) -> list[str]:
    return [line for line in log.splitlines() if f"Task {task}[" in line and line.rstrip().endswith("received")]


def test_path_attacks_are_refused_and_nothing_lands_outside(dep: Deployment, unet_model: Path,
                                                            tmp_path: Path) -> None:
    """Scenario 12: `..`, symlinks out of SEGQ_ALLOWED_ROOTS and odd names are refused at submit with nothing
    queued; an output directory swapped for a symlink after submit, a tampered row and an input changed
    since submission are refused by the worker; nothing is written outside the output directory."""
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    scans = allowed / "scans"
    write_volume(scans / "sub" / "a.nii.gz", SMALL, seed=1)
    write_volume(scans / "b.nii.gz", SMALL, seed=2)
    write_volume(scans / "c.nii.gz", SMALL, seed=3)
    write_volume(outside / "secret.nii.gz", SMALL, seed=4)
    attacks = {
        "dotdot input": ([str(scans / ".." / ".." / "outside" / "secret.nii.gz")], allowed / "out"),
        "dotdot out": ([str(scans)], allowed / ".." / "outside" / "out"),
    }
    messages = {}
    for name, (inputs, out) in attacks.items():
        result = dep.segq("submit", *inputs, "--out", str(out), "--model", str(unet_model))
        assert result.returncode != 0 and "outside the allowed roots" in result.stderr, (name, result.stderr)
        messages[name] = result.stderr.strip().splitlines()[-1]
    odd = scans / "odd dir"  # spaces and ; are a real dataset's names (issue 24); an escape code is not
    write_volume(odd / "x;rm\x1b[2J.nii.gz", SMALL, seed=5)
    result = dep.segq("submit", str(odd), "--out", str(allowed / "out"), "--model", str(unet_model))
    assert result.returncode != 0 and "holds control characters (\\x1b)" in result.stderr, result.stderr
    (odd / "x;rm\x1b[2J.nii.gz").unlink()
    odd.rmdir()
    (scans / "escape").symlink_to(outside, target_is_directory=True)
    result = dep.segq("submit", str(scans), "--out", str(allowed / "out"), "--model", str(unet_model))
    assert result.returncode != 0 and "secret.nii.gz, outside the allowed roots" in result.stderr, result.stderr
    (scans / "escape").unlink()
    with session_scope() as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 0
    assert dep.redis.pending() == {}

    out = allowed / "out"
    submitted = dep.submit([scans], out, unet_model)
    by_name = {Path(r.input_path).name: r.id for r in dep.jobs()}
    (out / "sub").symlink_to(outside, target_is_directory=True)  # swapped after submit, before the merge
    with session_scope() as s:  # a tampered row: the output path points out of the output directory
        s.execute(update(Job).where(Job.id == by_name["b.nii.gz"]).values(output_path=str(outside / "b_seg.nii.gz")))
    write_volume(scans / "c.nii.gz", SMALL, seed=9)  # changed since submission
    before = sorted(p.name for p in outside.rglob("*"))
    dep.worker("w1")
    dep.wait(120)
    rows = {Path(r.input_path).name: r for r in dep.jobs()}
    assert len(rows) == len(submitted.job_ids) == 3
    assert "a directory on the way is a symlink out of the output directory" in (rows["a.nii.gz"].error or "")
    assert "not inside its dataset's output directory" in (rows["b.nii.gz"].error or "")
    assert "changed since it was submitted" in (rows["c.nii.gz"].error or "")
    assert sorted(p.name for p in outside.rglob("*")) == before, "something was written outside"
    (out / "sub").unlink()
    assert_nothing_lost(dep, unet_model, done=set())
    figure("12 path attacks", f"4 submits refused (0 rows, 0 messages), e.g. {messages['dotdot input'][-90:]!r}; "
           "3 jobs failed by the worker, 0 files outside")


def _hostile_files(scans: Path) -> dict[str, str]:
    """name -> the reason the worker must give."""
    scans.mkdir(parents=True, exist_ok=True)
    raw = gzip.compress(bytes(nifti_bytes((40, 40, 40))))
    (scans / "truncated.nii.gz").write_bytes(raw[: len(raw) // 2])
    stored = bytearray(gzip.compress(bytes(nifti_bytes((32, 32, 32))), compresslevel=0))
    stored[len(stored) // 2] ^= 0xFF
    (scans / "corrupt.nii.gz").write_bytes(bytes(stored))
    liar = claim_shape(nifti_bytes((16, 16, 16), np.float64), (400, 400, 400))  # 512 MB claimed, 32 kB held
    (scans / "liar.nii.gz").write_bytes(gzip.compress(bytes(liar)))
    with gzip.open(scans / "bomb.nii.gz", "wb") as handle:
        handle.write(bytes(nifti_bytes((32, 32, 32))))
        for _ in range(64):
            handle.write(bytes(1 << 20))
    (scans / "huge.nii").write_bytes(bytes(claim_shape(nifti_bytes(version=2), (65535, 65535, 65535))))
    (scans / "five.nii.gz").write_bytes(gzip.compress(bytes(nifti_bytes((8, 8, 8, 2, 2)))))
    (scans / "channels.nii.gz").write_bytes(gzip.compress(bytes(nifti_bytes((8, 8, 8, 3)))))
    nan_affine = nifti_bytes()
    nan_affine[254:256] = (1).to_bytes(2, "little")  # sform_code 1, then srow_x[0] = NaN
    nan_affine[280:284] = np.float32(np.nan).tobytes()
    (scans / "nanaffine.nii.gz").write_bytes(gzip.compress(bytes(nan_affine)))
    return {
        "truncated.nii.gz": "corrupt or truncated", "corrupt.nii.gz": "corrupt or truncated",
        "liar.nii.gz": "corrupt or truncated", "bomb.nii.gz": "gzip bomb", "huge.nii": "above the limit",
        "five.nii.gz": "not a 3D volume", "channels.nii.gz": "has 3 channel(s)", "nanaffine.nii.gz": "affine holds NaN",
    }


def test_hostile_nifti_fails_before_inference_with_bounded_memory(dep: Deployment, unet_model: Path,
                                                                  tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Scenario 13: a producer that skipped the header checks queues hostile files; the worker fails each
    with its reason before any inference, once, and its peak memory stays near its idle size."""
    import producer.submit

    scans = tmp_path / "allowed" / "scans"
    expected = _hostile_files(scans)
    monkeypatch.setattr(producer.submit, "check_volume", lambda path, spec, limit: None)
    dep.submit([scans], tmp_path / "allowed" / "out", unet_model)
    monkeypatch.undo()
    w1 = dep.worker("w1")
    [child] = w1.children()
    idle = peak_rss_mb(child)
    dep.wait(120)
    peak = peak_rss_mb(child)
    assert w1.children() == [child], "no pool process may have died"
    rows = {Path(r.input_path).name: r for r in dep.jobs()}
    for name, reason in expected.items():
        assert rows[name].status == "failed" and reason in (rows[name].error or ""), (name, rows[name].error)
    log = w1.read_log()
    assert len(_received(log, "segq.segment_volume")) == len(expected), "each volume task must run exactly once"
    assert not _received(log, "segq.infer_slab") and "Retry in" not in log
    assert peak - idle < 100, f"the worker's peak memory grew by {peak - idle:.0f} MB on hostile files"
    write_volume(scans.parent / "good" / "good.nii.gz", SMALL, seed=3)
    dep.submit([scans.parent / "good"], tmp_path / "allowed" / "good_out", unet_model)
    dep.wait(120)
    assert_nothing_lost(dep, unet_model, done={"good.nii.gz"})
    figure("13 hostile NIfTI", f"{len(expected)} files failed before inference, each delivered once; pool process "
           f"peak RSS {peak:.0f} MB (idle {idle:.0f} MB; the 512 MB liar cost {peak - idle:.0f} MB)")


class _Payload:
    """Unpickling this runs a shell command: what a hostile pickle does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def _pickled_message(queue: str, marker: Path) -> bytes:
    """A Celery message whose body is a pickle that would create ``marker`` if anyone unpickled it."""
    body = pickle.dumps(((_Payload(marker),), {}, {"callbacks": None, "errbacks": None, "chain": None,
                                                     "chord": None}))
    task_id = str(uuid.uuid4())
    return json.dumps({
        "body": base64.b64encode(body).decode(), "content-encoding": "binary",
        "content-type": "application/x-python-serialize",
        "headers": {"lang": "py", "task": "segq.segment_volume", "id": task_id, "root_id": task_id,
                    "retries": 0, "timelimit": [None, None], "argsrepr": "(Evil(),)", "kwargsrepr": "{}"},
        "properties": {"correlation_id": task_id, "delivery_mode": 2, "priority": 0, "body_encoding": "base64",
                       "delivery_info": {"exchange": "", "routing_key": queue}, "delivery_tag": str(uuid.uuid4())},
    }).encode()


def test_pickled_message_and_pickled_checkpoint_are_never_executed(dep: Deployment, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Scenario 14: pickled messages pushed straight into both queues are discarded, never executed; a
    checkpoint that is not a plain state_dict is refused by submit (issue 13) and, queued by a producer that
    skipped that check, by the worker's weights_only loading, which fails its job once."""
    import producer.submit
    from segq.errors import InputError

    marker = tmp_path / "PWNED"
    client = dep.redis.client()
    for queue in ("coordinator", "gpu"):
        client.lpush(queue, _pickled_message(queue, marker))
    client.lpush("coordinator", b"\x80not json at all")
    evil = write_model(tmp_path / "allowed" / "evil", "UNet", roi=32, feature_size=4)
    torch.save({"state_dict": _Payload(marker)}, evil.parent / "model.pt")
    write_volume(tmp_path / "allowed" / "scans" / "a.nii.gz", SMALL, seed=1)
    with pytest.raises(InputError, match="Trying to load unsupported GLOBAL posix.system") as refused:
        dep.submit([tmp_path / "allowed" / "scans"], tmp_path / "allowed" / "out", evil)
    assert "\n" not in str(refused.value) and not marker.exists()
    monkeypatch.setattr(producer.submit, "check_checkpoint", lambda spec: None)
    dep.submit([tmp_path / "allowed" / "scans"], tmp_path / "allowed" / "out", evil)
    monkeypatch.undo()
    w1 = dep.worker("w1")
    dep.wait(120)
    wait_for(lambda: not dep.redis.pending(), 30, "the queues to drain")
    assert not marker.exists(), "a pickle was executed"
    [row] = dep.jobs()
    assert "not a plain PyTorch state_dict loadable with weights_only=True" in (row.error or ""), row.error
    assert row.deliveries == {0: 1}
    log = w1.read_log()
    assert "pickle" in log.lower() and ("ContentDisallowed" in log or "untrusted content" in log), log[-3000:]
    assert w1.proc is not None and w1.proc.poll() is None, "the worker must survive hostile messages"
    with session_scope() as s:
        assert s.scalar(select(func.count()).select_from(Dataset)) == 1
    assert_nothing_lost(dep, evil, done=set())
    figure("14 pickle message and checkpoint", "2 pickled messages and 1 junk message discarded, 0 executed; "
           "pickled checkpoint refused by weights_only, job failed after 1 delivery")
