"""The accuracy gate's kept verdicts and fp32 reference: a start with the same engine, PyTorch, GPU and checkpoint
reads the verdict instead of running the gate; any change of those runs it again; the fp32 reference is computed
once per machine. Real engines (a tiny UNet in bf16 on the CPU, a mixed mode and so gated), real files."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from segq.pipeline.toml import load_model_spec
from segq.settings import Settings
from tests.helpers import write_model
from worker import runtime
from worker.engines import verdicts
from worker.engines.model import build_network


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """How often the gate compared masks and how often an fp32 reference engine ran."""
    calls = {"gate": 0, "reference": 0}
    real_check, real_mask = verdicts.check_mask, verdicts.reference_mask

    def check(*args: Any, **kwargs: Any) -> Any:
        calls["gate"] += 1
        return real_check(*args, **kwargs)

    def reference(*args: Any, **kwargs: Any) -> Any:
        calls["reference"] += 1
        return real_mask(*args, **kwargs)

    monkeypatch.setattr(verdicts, "check_mask", check)
    monkeypatch.setattr(verdicts, "reference_mask", reference)
    return calls


def _start(model: dict[str, Any], sha: str, settings: Settings) -> str:
    runtime.clear()
    spec, _ = runtime.engine_for(model, sha, settings)
    clock = runtime.last_start(sha, settings, spec.sw_batch_size)
    assert clock is not None and "gate" in clock.seconds
    return str(clock.notes["gate_verdict"])


def test_a_second_start_reads_the_kept_verdict_and_any_change_runs_the_gate_again(
    tmp_path: Path, counted: dict[str, int], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    toml = write_model(tmp_path / "m", "UNet", roi=32, feature_size=4, sw_batch_size=4)
    spec = load_model_spec(toml)
    model, sha = spec.to_dict(), spec.checksum()
    settings = Settings(backend="torch", precision="bf16", device="cpu", engine_dir=tmp_path / "engines")
    try:
        assert _start(model, sha, settings) == "ran"
        assert counted == {"gate": 1, "reference": 1}
        kept = sorted(p.name for p in (settings.engine_root / sha[:16] / "gate").iterdir())
        assert [name.split("-")[0] for name in kept] == ["reference", "verdict"]

        with caplog.at_level(logging.INFO):
            assert _start(model, sha, settings) == "cached verdict"  # a fresh start, same everything: no gate
        assert counted == {"gate": 1, "reference": 1}
        assert "used the cached verdict" in caplog.text and "accuracy gate passed: Dice" in caplog.text

        # Another PyTorch (or GPU): the verdict misses; the reference is keyed by the machine too, so it reruns.
        real = verdicts.machine_identity
        monkeypatch.setattr(verdicts, "machine_identity", lambda device: {**real(device), "torch": "9.9.9"})
        assert _start(model, sha, settings) == "ran"
        assert counted == {"gate": 2, "reference": 2}
        monkeypatch.setattr(verdicts, "machine_identity", real)

        # Another engine on the same machine (here, another ROI batch): the gate runs, the fp32 reference is read.
        assert _start(model, sha, settings.model_copy(update={"torch_compile": "default"})) in (
            "ran against the cached fp32 reference",
        )
        assert counted == {"gate": 3, "reference": 2}

        # Verdicts kept off: the gate runs on every start.
        assert _start(model, sha, settings.model_copy(update={"gate_cache": False})) == "ran"
        assert counted == {"gate": 4, "reference": 3}

        # A kept pass below a raised bar is not taken: the gate runs and refuses.
        from segq.errors import EngineRefusedError

        with pytest.raises(EngineRefusedError, match="accuracy gate refused"):
            _start(model, sha, settings.model_copy(update={"gate_min_dice": 1.01}))
    finally:
        runtime.clear()


def test_a_new_checkpoint_is_a_new_model_whose_gate_runs(tmp_path: Path, counted: dict[str, int]) -> None:
    toml = write_model(tmp_path / "m", "UNet", roi=32, feature_size=4, sw_batch_size=4)
    spec = load_model_spec(toml)
    settings = Settings(backend="torch", precision="bf16", device="cpu", engine_dir=tmp_path / "engines")
    first = spec.checksum()
    try:
        assert _start(spec.to_dict(), first, settings) == "ran"
        torch.manual_seed(1)
        torch.save(build_network(spec).state_dict(), spec.checkpoint)  # retrained weights, same file
        changed = load_model_spec(toml)
        assert changed.checksum() != first
        assert _start(changed.to_dict(), changed.checksum(), settings) == "ran"
        assert counted == {"gate": 2, "reference": 2}
    finally:
        runtime.clear()


def test_a_verdict_for_another_identity_or_a_damaged_file_is_not_read(tmp_path: Path) -> None:
    identity = {"backend": "torch", "precision": "fp16", "torch": "2.11.0"}
    path = verdicts.verdict_path(tmp_path, "ab" * 32, identity)
    verdicts.write_verdict(path, identity, {"dice": 0.9995, "agreement": 0.9999})
    assert verdicts.read_verdict(path, identity) == {"dice": 0.9995, "agreement": 0.9999}
    assert verdicts.read_verdict(path, {**identity, "torch": "2.12.0"}) is None
    assert verdicts.verdict_path(tmp_path, "ab" * 32, {**identity, "torch": "2.12.0"}) != path
    path.write_text("{not json")
    assert verdicts.read_verdict(path, identity) is None
