"""SEGQ_TORCH_COMPILE=aot and precompile: a compiled network saved once, probed in a child process, loaded by
later starts without compiling (aot: without even the eager network) or the gate, and refused with a way out
when it does not load."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch

from segq.errors import EngineRefusedError
from segq.pipeline.toml import load_model_spec
from segq.settings import Settings
from tests.helpers import write_model
from worker import runtime
from worker.engines import aot
from worker.engines.torch_engine import TorchEngine

CPU = torch.device("cpu")


@pytest.mark.parametrize("kind", ["aot", "precompile"])
def test_a_package_is_built_once_gated_once_and_loaded_after(kind: str, tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The real path on the CPU: the compile (inductor's C++ build), the probe in a child process, the gate
    against fp32 eager; the second start loads the file without compiling (an AOT package without building the
    eager network either) and keeps the recorded verdict."""
    toml = write_model(tmp_path / "m", "UNet", roi=32, feature_size=4, sw_batch_size=2)
    spec = load_model_spec(toml)
    model, sha = spec.to_dict(), spec.checksum()
    settings = Settings(backend="torch", precision="fp32", device="cpu", torch_compile=kind,
                        engine_dir=tmp_path / "engines")
    runtime.clear()
    try:
        with caplog.at_level(logging.INFO):
            _, first = runtime.engine_for(model, sha, settings)
        assert isinstance(first, TorchEngine) and first.package is not None
        assert first.package.parent.parent == settings.engine_root
        meta = aot.AotMeta.read(first.package)
        assert meta is not None and meta.loads is True and meta.load_error is None
        assert meta.accuracy is not None and meta.accuracy["dice"] >= settings.gate_min_dice
        assert f"building {first.package.name}" in caplog.text and "accuracy gate passed: Dice" in caplog.text

        x = torch.randn(3, spec.in_channels, *spec.roi)  # not the package's batch: padded and split to 2
        torch.testing.assert_close(first(x), TorchEngine(spec, CPU, "fp32")(x), atol=1e-4, rtol=0)

        runtime.clear()
        caplog.clear()
        if kind == "aot":
            monkeypatch.setattr("worker.engines.torch_engine.load_model", _no_eager_network)
        monkeypatch.setattr(torch, "compile", _no_compile)
        with caplog.at_level(logging.INFO):
            _, second = runtime.engine_for(model, sha, settings)
        assert second is not first and "building" not in caplog.text
        assert "accuracy gate passed when the package was built" in caplog.text
        torch.testing.assert_close(second(x), first(x), atol=0, rtol=0)
    finally:
        runtime.clear()


def _no_eager_network(*_: object) -> None:
    raise AssertionError("a start that finds its AOT package must not build the eager network")


def _no_compile(*_: object, **__: object) -> None:
    raise AssertionError("a start that finds its compiled network must not compile")


def test_a_package_that_does_not_load_is_probed_once_and_refused_with_the_way_out(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The child process really loads the file: here a corrupt package. The verdict stays in the sidecar,
    so the next start refuses at once instead of probing (or crashing) again."""
    toml = write_model(tmp_path / "m", "UNet", roi=32, feature_size=4, sw_batch_size=2)
    spec = load_model_spec(toml)

    def corrupt_build(network: torch.nn.Module, example: torch.Tensor, path: Path, options: object) -> None:
        path.write_bytes(b"not a package")

    monkeypatch.setattr(aot, "build", corrupt_build)
    with pytest.raises(EngineRefusedError, match=r"cannot be used with PyTorch .*loading it failed: .*"
                                                 r"Set SEGQ_TORCH_COMPILE=default"):
        TorchEngine(spec, CPU, "fp32", compile_mode="aot", engine_root=tmp_path / "engines")
    package = next((tmp_path / "engines").rglob("*.pt2"))
    meta = aot.AotMeta.read(package)
    assert meta is not None and meta.loads is False and meta.load_error

    def no_second_probe(*_: object) -> str:
        raise AssertionError("the sidecar already says the package does not load")

    monkeypatch.setattr(aot, "probe", no_second_probe)
    with pytest.raises(EngineRefusedError, match="cannot be used"):
        TorchEngine(spec, CPU, "fp32", compile_mode="aot", engine_root=tmp_path / "engines")


def test_a_crashing_probe_is_named_by_its_signal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the H200 machine's PyTorch 2.11 did: the loading process died of SIGSEGV (here it kills itself)."""
    monkeypatch.setattr(aot, "PROBE_COMMAND", [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), 11)"])
    spec = load_model_spec(write_model(tmp_path / "m", "UNet", roi=32, feature_size=4))
    assert aot.probe(tmp_path / "p.pt2", spec.to_dict(), CPU, "fp32") == "the process that loaded it died of SIGSEGV"


def test_a_package_belongs_to_its_model_precision_batch_hardware_and_pytorch(tmp_path: Path) -> None:
    path = aot.package_path(tmp_path, "ab" * 32, "fp16", 16, CPU)
    assert path.parent == tmp_path / ("ab" * 8)
    assert path.name.startswith("aot-fp16-b16-cpu-torch") and path.suffix == ".pt2"
    assert aot.package_path(tmp_path, "ab" * 32, "fp16", 16, CPU, "precompile").name.startswith("precompile-fp16-b16")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"x")
    aot.AotMeta("ab" * 32, "fp16", 16, "cpu", torch.__version__, 1.0).write(path)
    assert aot.fits(path, "ab" * 32, "fp16", 16, CPU) is not None
    assert aot.fits(path, "cd" * 32, "fp16", 16, CPU) is None
    assert aot.fits(path, "ab" * 32, "fp16", 8, CPU) is None
    aot.AotMeta("ab" * 32, "fp16", 16, "cpu", "1.0.0", 1.0).write(path)  # built by another PyTorch
    assert aot.fits(path, "ab" * 32, "fp16", 16, CPU) is None


def test_precompile_skips_only_monais_input_size_check_which_the_model_file_already_makes() -> None:
    """Dynamo's ahead-of-time compile takes one graph; SwinUNETR's numpy size check in forward would break it."""
    from segq.errors import InputError
    from segq.modelspec import ModelSpec
    from worker.engines.model import build_network

    swin = build_network(ModelSpec("SwinUNETR", 1, 2, 64, 1, checkpoint=Path("unused.pt"), feature_size=12))
    with pytest.raises(ValueError, match="divisible"):
        swin._check_input_size((65, 64, 64))
    aot.skip_input_size_checks(swin)
    swin._check_input_size((65, 64, 64))  # a no-op now: the compiled engine sees only the model file's ROI
    with pytest.raises(InputError, match="divisible by 32"):
        ModelSpec("SwinUNETR", 1, 2, 80, 1, checkpoint=Path("unused.pt"), feature_size=12).validate()
