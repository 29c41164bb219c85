"""Round three of faults (issue 24, items 8-10): outputs and storage, with real workers on a throwaway Redis.

A job that ends during its merge leaves none of its outputs; a disk that fills part-way through a write is a
full disk, and the job runs once space is freed; a worker that cannot see the shared storage stops taking work
instead of failing other workers' jobs. The pure checks are unit-tested in tests/unit/test_hostile_storage.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from segq import faults
from tests.helpers import write_volume
from tests.reliability import (
    Deployment,
    assert_mask_matches,
    assert_nothing_lost,
    deployment,
    figure,
    wait_drained,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SMALL = (40, 36, 32)
FAMILY = ("_seg.nii.gz", "_prob.nii.gz", "_seg.json", "_seg.dcm")


def _family(out: Path, stem: str) -> list[str]:
    """The outputs of the input ``stem`` that exist under ``out`` (mask, probabilities, label sidecar, SEG)."""
    return sorted(p.name for p in (out / f"{stem}{suffix}" for suffix in FAMILY) if p.exists())


def _can_mount() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs none /mnt"], capture_output=True)
    return probe.returncode == 0


CAN_MOUNT = _can_mount()
needs_mounts = pytest.mark.skipif(not CAN_MOUNT, reason="needs `unshare -m` and mount (root in a namespace)")


def _cancel_elsewhere(dep: Deployment, target: str, hidden: list[Path]) -> str:
    """`segq cancel` from a machine that does not mount ``hidden`` (--out, the storage): a namespace of its own
    where each is an empty tmpfs. Only the workers can then remove what the merge wrote."""
    mounts = " && ".join(f'mount -t tmpfs none "{path}"' for path in hidden)
    result = subprocess.run(["unshare", "-m", "sh", "-c", f'{mounts} && exec "$@"', "sh", sys.executable, "-m",
                             "segq.cli", "cancel", target], env={**os.environ, **dep.env}, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


MERGE_PAUSES = [
    pytest.param("before_merge_rename:output=a_seg.nii.gz", "here", id="mask-in-temp"),
    pytest.param("before_merge_rename:output=a_seg.nii.gz", "elsewhere", id="mask-in-temp-cancel-elsewhere",
                 marks=needs_mounts),
    pytest.param("before_merge_finish:output=a_seg.nii.gz", "elsewhere", id="all-written-cancel-elsewhere",
                 marks=needs_mounts),
]


@pytest.mark.parametrize(("point", "where"), MERGE_PAUSES)
def test_cancel_during_merge_leaves_no_output_of_the_job(tmp_path: Path, unet_model: Path, point: str,
                                                          where: str) -> None:
    """Scenario 24.8: a dataset is cancelled while its volume's merge is paused, with the probability map renamed
    into place and the mask under its temp name, or with every output written and the job row not yet done; the
    cancel runs here, or on a machine that does not mount --out (so only the worker can clean up). No output of
    the cancelled job remains; the other dataset's mask and probability map stay. Before: the probability map
    stayed in --out (the cancel deleted the mask's live temp file, the merge then failed on it and removed only
    temp files)."""
    from producer.manage import cancel

    out = tmp_path / "out"
    # The pause must not reach the task's soft time limit, which would end the merge with another error.
    with deployment(tmp_path, SEGQ_TASK_TIME_LIMIT="90", SEGQ_VISIBILITY_TIMEOUT="91") as dep:
        dep.worker("w1")
        kept = write_volume(tmp_path / "kept" / "b.nii.gz", SMALL, seed=2)
        dep.submit([kept], out, unet_model, name="kept", save_probabilities=True)
        wait_for(lambda: [r.status for r in dep.jobs()] == ["done"], 120, "the first dataset to be done")
        pause = f"pause_{point}:times=1:seconds=20"
        dep.arm(pause)
        dep.submit([write_volume(tmp_path / "gone" / "a.nii.gz", SMALL, seed=1)], out, unet_model, name="gone",
                   save_probabilities=True)
        wait_for(lambda: faults.hits(dep.faults_dir, pause), 120, "the merge to pause")
        written = _family(out, "a")
        if where == "here":
            assert len(cancel("gone")) == 1
        else:
            assert "cancelled 1 job(s)" in _cancel_elsewhere(dep, "gone", [out, dep.storage])
        ended = time.monotonic()
        assert wait_drained(dep, 60) == {}, "the paused merge did not end"
        rows = {Path(r.input_path).name: r for r in assert_nothing_lost(dep, unet_model)}
        assert rows["a.nii.gz"].status == "cancelled" and rows["b.nii.gz"].status == "done", rows
        assert _family(out, "a") == [], f"outputs of the cancelled job left: {_family(out, 'a')}"
        assert _family(out, "b") == ["b_prob.nii.gz", "b_seg.nii.gz"]
        assert_mask_matches(out / "b_seg.nii.gz", kept, unet_model)
        removed = dep.log().count("ended during the merge")
        assert "TimeLimitExceeded" not in dep.log()
    figure(f"24.8 cancel during merge ({point.split(':')[0]}, cancel {where})",
           f"in --out at the cancel: {written or 'only temp files'}; after the merge ended "
           f"({time.monotonic() - ended:.1f} s): none of them ({removed} removed by the worker); the other "
           "dataset's 2 files kept")
