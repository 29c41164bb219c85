"""Issue 24, item 11: `segq watch` exited while a volume was still running (a real worker, a real `segq watch`)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT, write_volume
from tests.reliability import assert_nothing_lost, deployment, figure, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SHAPE = (40, 36, 32)


def test_watch_waits_for_a_volume_requeued_after_it_ended(tmp_path: Path, unet_model: Path) -> None:
    """x fails once, y prepares slowly; while y runs, `segq retry --failed` sends x again, and its new prepare
    pauses past y's end. `segq watch` counted the volumes it had seen end (x, then y: 2 of 2) and exited while x
    ran again; it must wait for x's second end and exit 0."""
    faults = "raise_in_prepare:input=x.nii.gz:times=1,pause_in_prepare:input=y.nii.gz:times=1:seconds=40"
    # y pauses 40 s: time enough to re-queue x before y ends, on a loaded machine too (task limit raised to fit)
    with deployment(tmp_path, SEGQ_ADMIT_INTERVAL="1", SEGQ_TASK_TIME_LIMIT="90", SEGQ_VISIBILITY_TIMEOUT="91") as dep:
        dep.worker("w1", concurrency=2, env={"SEGQ_FAULTS": faults})
        scans = [write_volume(tmp_path / "scans" / f"{n}.nii.gz", SHAPE, seed=k) for k, n in enumerate("xy")]
        submitted = dep.submit(scans, tmp_path / "out", unet_model)
        log = tmp_path / "watch.log"
        with open(log, "w") as handle:
            watch = subprocess.Popen([sys.executable, "-m", "segq.cli", "watch", submitted.dataset_id, "--poll", "0.3"],
                                     env={**os.environ, **dep.env}, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: "failed  " in log.read_text(), 120, "watch to report x failed")
            dep.arm("pause_in_prepare:input=x.nii.gz:times=1:seconds=55")  # its second prepare outlasts y
            retried = dep.segq("retry", submitted.dataset_id, "--failed")
            assert retried.returncode == 0 and "re-queued 1 job" in retried.stdout, retried.stdout + retried.stderr
            wait_for(lambda: {r.status for r in dep.jobs() if r.input_path.endswith("y.nii.gz")} == {"done"}, 120,
                     "y done")
            y_done = time.monotonic()
            code = watch.wait(180)
            waited = time.monotonic() - y_done
            rows = dep.jobs()
        finally:
            watch.kill()
        text = log.read_text()
        assert code == 0, text
        assert [r.status for r in rows] == ["done", "done"], rows  # when watch exited, x's second run was done too
        assert text.count("done    ") == 2 and "2 done, 0 failed or cancelled" in text, text
        assert_nothing_lost(dep, unet_model)
    figure("watch re-queued volume", f"watch waited {waited:.0f} s after y ended, for x's second run; exit 0")
