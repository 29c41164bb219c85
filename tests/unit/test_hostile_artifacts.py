"""Hostile checkpoints, plan files and fault specs (issue 6, scenario 14), without a worker."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from segq.errors import InputError
from worker.engines.model import load_state_dict


class _Payload:
    """Unpickling this runs a shell command: what a hostile checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_pickled_code_in_a_checkpoint_is_refused_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": _Payload(marker)}, path)
    with pytest.raises(InputError, match="not a plain PyTorch state_dict loadable with weights_only=True"):
        load_state_dict(path)
    assert not marker.exists()


def test_a_whole_pickled_module_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(2, 2), path)
    with pytest.raises(InputError, match="weights_only=True"):
        load_state_dict(path)


def test_a_state_dict_of_something_else_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "numbers.pt"
    torch.save({"weight": 3}, path)
    with pytest.raises(InputError, match="not a state_dict of tensors"):
        load_state_dict(path)
    good = tmp_path / "good.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), good)
    assert set(load_state_dict(good)) == {"weight", "bias"}


def test_a_plan_whose_bytes_changed_is_refused(tmp_path: Path) -> None:
    """The TensorRT plan's sha256 is recorded at build; a plan changed since is refused before TensorRT sees it."""
    plans = pytest.importorskip("worker.engines.plans")
    target = plans.PlanTarget("NVIDIA H100 80GB HBM3", "9.0", "10.9.0")
    meta = plans.PlanMeta(onnx_sha256="a" * 64, plan_sha256="", gpu_name=target.gpu_name,
                          compute_capability=target.compute_capability, trt_version=target.trt_version,
                          precision="fp16", profile={"min": 1, "opt": 8, "max": 16})
    plan = tmp_path / "model.plan"
    plans.write_plan(plan, b"serialized engine bytes", meta)
    assert plans.check_plan(plan, target).plan_sha256 == meta.plan_sha256
    plan.write_bytes(b"serialized engine bytes, then tampered with")
    with pytest.raises(plans.PlanRefusedError, match="its bytes changed since the build"):
        plans.check_plan(plan, target)
    plans.sidecar_path(plan).unlink()
    with pytest.raises(plans.PlanRefusedError, match="sidecar .* is missing"):
        plans.check_plan(plan, target)


def test_fault_specs_parse_strictly() -> None:
    from segq.faults import parse

    [fault] = parse("kill_in_infer_slab:slab=1:times=2")
    assert (fault.action, fault.point, fault.match, fault.times) == ("kill", "in_infer_slab", {"slab": "1"}, 2)
    [pause] = parse(" pause_before_merge_rename:seconds=2.5 ")
    assert pause.seconds == 2.5 and pause.times is None
    assert parse("") == []
    for bad in ("explode_in_infer_slab", "kill_in_nowhere", "kill"):
        with pytest.raises(ValueError, match="SEGQ_FAULTS"):
            parse(bad)


def test_fault_points_are_silent_unless_configured(tmp_path: Path) -> None:
    from segq import faults
    from tests.helpers import environment

    with environment({"SEGQ_FAULTS": "", "SEGQ_FAULTS_DIR": ""}):
        faults.point("in_infer_slab", slab=1)  # no faults configured: nothing happens
    with environment({"SEGQ_FAULTS": "raise_in_infer_slab:slab=2:times=1", "SEGQ_FAULTS_DIR": str(tmp_path)}):
        faults.point("in_infer_slab", slab=1)
        with pytest.raises(RuntimeError, match="injected fault raise_in_infer_slab"):
            faults.point("in_infer_slab", slab=2)
        faults.point("in_infer_slab", slab=2)  # times=1: used up, also for the next process
        assert [h["slab"] for h in faults.hits(tmp_path, "raise_in_infer_slab:slab=2:times=1")] == ["2"]


@pytest.mark.parametrize(("url", "shown"), [
    ("redis://:s3cret@redis:6379/0", "redis://:***@redis:6379/0"),
    ("rediss://default:s3cret@cache.example:6380/1?ssl_cert_reqs=required",
     "rediss://default:***@cache.example:6380/1?ssl_cert_reqs=required"),
    ("postgresql+psycopg2://segq:s3cret@db/segq", "postgresql+psycopg2://segq:***@db/segq"),
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ("redis://user@[::1]:6379/0", "redis://user@[::1]:6379/0"),
    ("redis://:pw@[::1]:6379/0", "redis://:***@[::1]:6379/0"),
])
def test_passwords_are_masked_in_logged_urls(url: str, shown: str) -> None:
    from segq.broker import mask_url

    assert mask_url(url) == shown
    assert "s3cret" not in mask_url(url)
