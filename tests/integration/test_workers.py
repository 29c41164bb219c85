"""Workers across machines and the per-GPU launcher, with real Redis, SQLite and `segq worker --gpus none` processes.

Two launchers with different node names stand in for two machines (this machine has no GPU and 2 cores).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.conftest import Stack
from tests.helpers import ROOT, environment, load_mask
from tests.integration.test_pipeline import segq
from tests.integration.test_workers_helpers import MODULE, SLEEP, Launched

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SHAPE = (70, 40, 36)  # 4 x 2 x 2 = 16 windows of ROI 32 at overlap 0.5: 8 subtasks of 2


def write_copy(path: Path, data: np.ndarray, tag: str) -> Path:
    """The same voxels under another header description: a new content hash, so no result is reused."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(data, np.diag([1.0, 1.0, 2.0, 1.0]))
    image.header["descrip"] = tag.encode()
    nib.save(image, str(path))
    return path


def run_one(env: dict[str, str], volume: Path, out: Path, model: Path, name: str) -> dict[str, object]:
    segq("submit", str(volume), "--out", str(out), "--model", str(model), "--name", name, "--wait",
         "--timeout", "300", "--max-windows-per-subtask", "2", "--save-probabilities", env=env)
    rows = json.loads(segq("results", name, "--format", "json", env=env).stdout)
    assert len(rows) == 1 and rows[0]["status"] == "done", rows
    return dict(rows[0])


def test_two_machines_share_a_volume_and_match_one(fresh_stack: Stack, unet_model: Path, tmp_path: Path) -> None:
    data = np.random.default_rng(5).normal(size=SHAPE).astype(np.float32)
    alone = write_copy(tmp_path / "scans1" / "ct.nii.gz", data, "run alone")
    shared = write_copy(tmp_path / "scans2" / "ct.nii.gz", data, "run on two")
    machine_a = Launched(fresh_stack.env, tmp_path / "a.log", "--gpus", "none", "-n", "machine-a")
    machine_b = Launched(fresh_stack.env, tmp_path / "b.log", "--gpus", "none", "-n", "machine-b")
    try:
        machine_a.start(ready=2)
        one = run_one(fresh_stack.env, alone, tmp_path / "out1", unet_model, f"alone-{tmp_path.name}")
        assert one["workers"] == "cpu0@machine-a", one

        machine_b.start(ready=2)
        two = run_one(fresh_stack.env, shared, tmp_path / "out2", unet_model, f"two-{tmp_path.name}")
    finally:
        machine_a.cleanup()
        machine_b.cleanup()
    assert int(str(two["subtasks"])) >= 6, two
    assert set(str(two["workers"]).split(",")) == {"cpu0@machine-a", "cpu0@machine-b"}, two
    np.testing.assert_array_equal(load_mask(tmp_path / "out2" / "ct_seg.nii.gz"),
                                  load_mask(tmp_path / "out1" / "ct_seg.nii.gz"))
    np.testing.assert_allclose(load_mask(tmp_path / "out2" / "ct_prob.nii.gz"),
                               load_mask(tmp_path / "out1" / "ct_prob.nii.gz"), atol=1e-6, rtol=0)


def test_worker_without_the_shared_storage_refuses_to_start_saying_so(fresh_stack: Stack, tmp_path: Path) -> None:
    """A launcher's GPU worker whose SEGQ_STORAGE is not the coordinator's stops at start with one line (exit 78),
    and the launcher does not restart it: before, it took every part and failed each job (issue 24, item 10)."""
    elsewhere = {**fresh_stack.env, "SEGQ_STORAGE": str(tmp_path / "another-machine-storage")}
    coordinator = Launched(fresh_stack.env, tmp_path / "coord.log", "--role", "coordinator", "-n", "machine-a")
    gpu = Launched(elsewhere, tmp_path / "gpu.log", "--gpus", "none", "--role", "gpu", "-n", "machine-b")
    try:
        coordinator.start(ready=1)
        with open(gpu.log, "ab") as handle:
            gpu.proc = subprocess.Popen([sys.executable, "-m", "segq.cli", "worker", *gpu.args], env=gpu.env,
                                        stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        gpu.wait_for("not restarting it", 1, 120)
    finally:
        coordinator.cleanup()
        gpu.cleanup()
    [line] = [line for line in gpu.read_log().splitlines() if "Error: storage is not shared" in line]
    assert "cpu0@machine-b" in line and str(tmp_path / "another-machine-storage") in line, line
    assert "Mount the same filesystem at the same path on every machine" in line, line
    assert "exit code 78" in gpu.read_log() and "Traceback" not in gpu.read_log()


def test_launcher_restarts_a_killed_worker_and_lets_a_task_finish_on_sigterm(fresh_stack: Stack,
                                                                            tmp_path: Path) -> None:
    launcher = Launched(fresh_stack.env, tmp_path / "launcher.log", "--gpus", "none", "--concurrency", "2",
                        "-n", "box", "-I", MODULE)
    try:
        launcher.start(ready=3)
        children = launcher.children()
        assert set(children) == {"cpu0@box", "cpu1@box", "coord@box"}, children
        for name, pid in children.items():  # each worker sees only what its role needs
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            assert b"CUDA_VISIBLE_DEVICES=" in environ, name
        assert launcher.proc is not None
        maps = Path(f"/proc/{launcher.proc.pid}/maps").read_text()
        assert "libtorch" not in maps and "libcuda" not in maps, "the launcher itself must never load torch/CUDA"
        log = launcher.read_log()
        assert "cpu0@box consumes gpu.high,gpu,gpu.low" in log
        assert "coord@box consumes finish.high,finish,finish.low,coordinator.high,coordinator,coordinator.low" in log

        os.kill(children["cpu1@box"], signal.SIGKILL)
        launcher.wait_for("cpu1@box died (exit code -9")
        launcher.wait_for(" ready.", 4)
        restarted = launcher.children()
        assert set(restarted) == set(children) and restarted["cpu1@box"] != children["cpu1@box"]
        assert restarted["cpu0@box"] == children["cpu0@box"], "only the dead worker is restarted"

        marker = str(tmp_path / "slow")
        with environment(fresh_stack.env):
            from segq.celery_app import get_app
            from segq.names import GPU_QUEUE

            result = get_app().send_task(SLEEP, args=(4.0, marker), queue=GPU_QUEUE)
            deadline = time.monotonic() + 60
            while not Path(marker + ".started").exists():
                assert time.monotonic() < deadline, launcher.read_log()[-4000:]
                time.sleep(0.1)
            code = launcher.terminate()
            stopped_at = time.time()
            assert result.get(timeout=10) in {"cpu0@box", "cpu1@box"}
    finally:
        launcher.cleanup()
    log = launcher.read_log()
    assert code == 0, log[-4000:]
    assert "warm shutdown" in log and "cold shutdown" not in log, log[-4000:]
    assert Path(marker + ".done").exists(), "the running task must finish before the worker exits"
    assert float(Path(marker + ".done").read_text()) <= stopped_at
    assert "every worker has stopped" in log
    assert not launcher.children()


def test_a_second_sigterm_is_a_cold_shutdown_that_hands_the_task_back(fresh_stack: Stack, tmp_path: Path) -> None:
    import redis

    launcher = Launched(fresh_stack.env, tmp_path / "launcher.log", "--gpus", "none", "-n", "cold", "-I", MODULE)
    marker = str(tmp_path / "long")
    try:
        launcher.start(ready=2)
        with environment(fresh_stack.env):
            from segq.celery_app import get_app
            from segq.names import GPU_QUEUE

            get_app().send_task(SLEEP, args=(120.0, marker), queue=GPU_QUEUE)
        deadline = time.monotonic() + 60
        while not Path(marker + ".started").exists():
            assert time.monotonic() < deadline, launcher.read_log()[-4000:]
            time.sleep(0.1)
        assert launcher.proc is not None
        launcher.proc.send_signal(signal.SIGTERM)
        launcher.wait_for("warm shutdown")
        code = launcher.terminate(timeout=60)  # the second SIGTERM
    finally:
        launcher.cleanup()
    log = launcher.read_log()
    assert code == 0 and "cold shutdown" in log, log[-4000:]
    assert not Path(marker + ".done").exists()
    assert "Restoring 1 unacknowledged message(s)" in log, log[-4000:]
    assert redis.Redis.from_url(fresh_stack.env["SEGQ_BROKER_URL"]).llen(GPU_QUEUE) == 1, "the task is queued again"
