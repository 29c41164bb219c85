"""Engines through the whole queue path: a worker on the ONNX Runtime backend against MONAI's torch
reference, and workers whose backend cannot load failing their start with one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from segq.modelspec import load_model_spec
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
