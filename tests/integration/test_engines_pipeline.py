"""Engines through the whole queue path: a worker on the ONNX Runtime backend against MONAI's torch
reference, and workers whose backend cannot load failing their start with one line."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from segq.pipeline.toml import load_model_spec
from tests.conftest import Stack
from tests.helpers import write_volume
from tests.integration.test_pipeline import assert_matches_reference, reference_probability, run_dataset, segq

pytestmark = pytest.mark.integration


def test_onnxruntime_backend_matches_the_torch_reference(fresh_stack: Stack, unet_model: Path,
                                                        tmp_path: Path) -> None:
    fresh_stack.env["SEGQ_BACKEND"] = "onnxruntime"
    worker = fresh_stack.worker("ort")
    scans = tmp_path / "scans"
    write_volume(scans / "vol.nii.gz", (70, 40, 36), seed=5, spacing=(1.0, 1.0, 1.5))
    out = tmp_path / "masks"
    run_dataset(fresh_stack, scans, out, unet_model, "--name", "ort", "--save-probabilities")
    row = json.loads(segq("results", "ort", "--format", "json", env=fresh_stack.env).stdout)[0]
    assert row["status"] == "done" and row["backend"] == "onnxruntime" and row["subtasks"] >= 2
    reference = reference_probability(scans / "vol.nii.gz", unet_model)
    assert_matches_reference(out / "vol_prob.nii.gz", out / "vol_seg.nii.gz", reference)
    sha = load_model_spec(unet_model).checksum()
    cached = Path(fresh_stack.env["SEGQ_STORAGE"]) / "engines" / sha[:16] / "model-fp32.onnx"
    assert cached.is_file() and cached.with_name("model-fp32.onnx.json").is_file()
    assert "onnxruntime session on CPUExecutionProvider" in worker.read_log()


@pytest.mark.parametrize(("env", "line"), [
    ({"SEGQ_BACKEND": "tensorrt"}, "Error: SEGQ_BACKEND=tensorrt needs"),
    ({"SEGQ_PRECISION": "fp16", "SEGQ_DEVICE": "cpu"},
     "Error: SEGQ_PRECISION=fp16 needs a CUDA GPU but SEGQ_DEVICE=cpu"),
])
def test_a_worker_whose_backend_cannot_load_fails_its_start(fresh_stack: Stack, env: dict[str, str],
                                                            line: str) -> None:
    fresh_stack.env.update(env)
    with pytest.raises(RuntimeError, match="exited with 78") as info:  # EX_CONFIG: the launcher will not restart it
        fresh_stack.worker("broken")
    log = str(info.value)
    assert line in log and "Traceback" not in log
    assert " ready." not in log


def test_warm_engine_builds_and_gates_the_workers_engine_once(fresh_stack: Stack, unet_model: Path) -> None:
    """`segq warm-engine` builds the engine the workers' settings name and runs its accuracy gate (bf16 on the
    CPU is a mixed mode, so it is gated against fp32 eager); a compiled engine's cache would be left behind."""
    env = {**fresh_stack.env, "SEGQ_PRECISION": "bf16", "SEGQ_DEVICE": "cpu"}
    done = segq("warm-engine", "-m", str(unet_model), env=env)
    assert "torch bf16 engine on cpu: ready in" in done.stdout
    assert "accuracy gate passed: Dice" in done.stderr
    missing = segq("warm-engine", "-m", str(unet_model.parent / "absent.toml"), env=env, check=False)
    assert missing.returncode != 0 and "absent.toml" in missing.stderr + missing.stdout


def test_a_worker_building_an_engine_is_listed_for_watch(fresh_stack: Stack) -> None:
    """While an engine builds (a first torch.compile: minutes) its worker is listed in Redis; watch prints a
    line for it; the listing goes when the build ends, whether it succeeded or not."""
    from producer.watch import engines_loading, loading_lines
    from segq.scheduler import loading
    from segq.settings import Settings
    from tests.helpers import environment

    with environment(fresh_stack.env):
        settings = Settings()
        with loading("gpu0@host", "torch fp16, torch.compile default", settings):
            listed = engines_loading(time.time() + 90)
        assert engines_loading(time.time()) == {}
        with pytest.raises(RuntimeError), loading("gpu1@host", "torch fp16", settings):
            raise RuntimeError("compile failed")
        assert engines_loading(time.time()) == {}
    assert list(listed) == ["gpu0@host"] and listed["gpu0@host"][0] == "torch fp16, torch.compile default"
    assert 89 <= listed["gpu0@host"][1] <= 120
    from producer.watch import Snapshot

    snap = Snapshot(total=0, counts={}, subtasks_done=0, subtasks_total=0, windows_done=0, windows_remaining=None,
                    windows_per_second=0.0, volumes_per_hour=0.0, eta_seconds=None, loading=listed)
    line = loading_lines(snap)[0]
    assert line.startswith("gpu0@host: building the torch fp16, torch.compile default engine for 1m")


def test_a_compiled_engine_is_compiled_once_per_machine(fresh_stack: Stack, unet_model: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """inductor's cache lives under the engine directory (SEGQ_STORAGE/engines/inductor): the second process
    to build the same compiled engine reads the graph instead of compiling it (on this CPU, 21 s then 7 s)."""
    import re

    # An engine compiled earlier in this test process set it (TorchEngine): the command must choose its own.
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    env = {**fresh_stack.env, "SEGQ_TORCH_COMPILE": "default", "SEGQ_DEVICE": "cpu"}
    seconds = []
    for _ in range(2):
        out = segq("warm-engine", "-m", str(unet_model), env=env).stdout
        assert "torch.compile default (ROI batch" in out
        seconds.append(float(re.search(r"ready in ([0-9.]+) s", out).group(1)))  # type: ignore[union-attr]
    cache = Path(fresh_stack.env["SEGQ_STORAGE"]) / "engines" / "inductor"
    assert (cache / "fxgraph").is_dir(), sorted(p.name for p in cache.iterdir())
    assert seconds[1] < 0.7 * seconds[0], seconds
