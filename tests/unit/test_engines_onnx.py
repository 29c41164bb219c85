"""The exported ONNX graph (the file TensorRT would build from) in ONNX Runtime's CPU build, the engine cache
and the export / build commands. TensorRT itself only where `import tensorrt` works."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from segq.errors import EngineError
from segq.pipeline.toml import load_model_spec
from segq.settings import Settings
from tests.helpers import ROOT, write_model
from worker.engines import create_engine
from worker.engines.cache import ensure_onnx, onnx_file
from worker.engines.onnx_export import OnnxMeta, export_onnx, run_onnx_cpu, sidecar_path
from worker.engines.ort_engine import OnnxRuntimeEngine
from worker.engines.torch_engine import TorchEngine


@pytest.fixture(scope="module")
def unet_toml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("onnx") / "unet", "UNet", roi=32, feature_size=4, sw_batch_size=2)


@pytest.fixture(scope="module")
def unet_onnx(unet_toml: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("onnx-out") / "unet.onnx"
    export_onnx(load_model_spec(unet_toml), out)
    return out


def test_export_has_a_dynamic_batch_and_matches_pytorch(unet_toml: Path, unet_onnx: Path) -> None:
    spec = load_model_spec(unet_toml)
    meta = OnnxMeta.read(unet_onnx)
    assert meta is not None and meta.model_sha256 == spec.checksum() and meta.precision == "fp32"
    assert meta.max_abs_diff <= 1e-3 and meta.roi == [32, 32, 32] and meta.model_path == str(unet_toml)
    from worker.engines.model import load_model

    for batch in (1, 3, 5):
        x = np.random.default_rng(batch).normal(size=(batch, 1, 32, 32, 32)).astype(np.float32)
        ours = run_onnx_cpu(unet_onnx, x)
        with torch.inference_mode():
            reference = load_model(spec)(torch.from_numpy(x)).numpy()
        assert ours.shape == (batch, 1, 32, 32, 32)
        np.testing.assert_allclose(ours, reference, atol=1e-4)
        assert ours.min() >= 0 and ours.max() <= 1  # the softmax of the target class is inside the graph


def test_export_refuses_when_onnxruntime_disagrees(unet_toml: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import worker.engines.onnx_export as onnx_export

    monkeypatch.setattr(onnx_export, "_compare", lambda *args: 0.02)
    out = tmp_path / "bad.onnx"
    with pytest.raises(EngineError, match=r"differs from PyTorch by 0\.02 \(> 0\.001\)"):
        export_onnx(load_model_spec(unet_toml), out)
    assert not out.exists() and not sidecar_path(out).exists() and not list(tmp_path.iterdir())


def test_fp16_export_keeps_float32_io(unet_toml: Path, tmp_path: Path) -> None:
    meta = export_onnx(load_model_spec(unet_toml), tmp_path / "unet16.onnx", precision="fp16")
    assert meta.precision == "fp16" and meta.max_abs_diff <= 2e-2
    import onnx

    graph = onnx.load(str(tmp_path / "unet16.onnx")).graph
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in graph.initializer)


def test_onnxruntime_engine_matches_the_torch_engine(unet_toml: Path, unet_onnx: Path) -> None:
    spec = load_model_spec(unet_toml)
    cpu = torch.device("cpu")
    ort_engine = OnnxRuntimeEngine(unet_onnx, cpu, "fp32")
    x = torch.randn(3, 1, 32, 32, 32)
    out = ort_engine(x)
    assert out.shape == (3, 1, 32, 32, 32) and out.dtype == torch.float32 and out.device == cpu
    torch.testing.assert_close(out, TorchEngine(spec, cpu, "fp32")(x), atol=1e-4, rtol=0)
    with pytest.raises(EngineError, match="pip install onnxruntime-gpu"):
        OnnxRuntimeEngine(unet_onnx, cpu, "fp16")


def test_cache_exports_once_even_when_two_workers_ask_together(unet_toml: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import worker.engines.onnx_export as onnx_export

    spec = load_model_spec(unet_toml)
    calls: list[Path] = []
    real = onnx_export.export_onnx

    def slow_export(*args: object, **kwargs: object) -> object:
        calls.append(Path(str(args[1])))
        time.sleep(0.5)  # the second worker arrives while the first exports
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(onnx_export, "export_onnx", slow_export)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(ensure_onnx(spec, "fp32", tmp_path))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    expected = onnx_file(tmp_path, spec.checksum(), "fp32")
    assert results == [expected, expected] and len(calls) == 1
    mtime = expected.stat().st_mtime_ns
    assert ensure_onnx(spec, "fp32", tmp_path) == expected and expected.stat().st_mtime_ns == mtime
    with pytest.raises(EngineError, match="no fp16 ONNX export of this model .* SEGQ_ENGINE_BUILD=true"):
        ensure_onnx(spec, "fp16", tmp_path, build=False)


def test_create_engine_builds_the_onnxruntime_engine_from_the_cache(unet_toml: Path, tmp_path: Path) -> None:
    spec = load_model_spec(unet_toml)
    settings = Settings(engine_dir=tmp_path, backend="onnxruntime")
    engine = create_engine(spec, "onnxruntime", "fp32", torch.device("cpu"), settings=settings)
    assert engine.backend == "onnxruntime" and onnx_file(tmp_path, spec.checksum(), "fp32").is_file()


def _segq(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "segq.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_export_onnx_command(unet_toml: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli.onnx"
    result = _segq("export-onnx", "--model", str(unet_toml), "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert "ONNX Runtime vs PyTorch on a random batch of 2: max |diff|" in result.stdout
    assert out.is_file() and sidecar_path(out).is_file()


def test_build_engine_command_says_how_to_get_tensorrt(unet_onnx: Path) -> None:
    pytest.importorskip("onnx")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        result = _segq("build-engine", "--onnx", str(unet_onnx), "--fp16")
        assert result.returncode != 0
        assert "segq build-engine needs TensorRT, and it is not installed" in result.stderr
        assert "pip install tensorrt" in result.stderr
    else:
        pytest.skip("TensorRT is installed: test_tensorrt_plan_round_trip covers the build")


@pytest.mark.slow
def test_tensorrt_plan_round_trip(unet_toml: Path, unet_onnx: Path, tmp_path: Path) -> None:
    """Only where TensorRT and a GPU exist: build, gate, load, run a batch beyond the profile, refuse tampering."""
    pytest.importorskip("tensorrt")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA GPU")
    from worker.engines.cache import build_and_gate
    from worker.engines.plans import PlanRefusedError, Profile, check_plan
    from worker.engines.trt_build import current_target
    from worker.engines.trt_engine import TensorRTEngine

    spec = load_model_spec(unet_toml)
    device = torch.device("cuda:0")
    plan = tmp_path / "unet.plan"
    meta = build_and_gate(unet_onnx, plan, "fp16", Profile(1, 2, 4), 1.0, spec, device)
    assert meta.accuracy["dice"] >= 0.99
    engine = TensorRTEngine(plan, check_plan(plan, current_target()), device)
    x = torch.randn(7, 1, 32, 32, 32, device=device)  # 4 + 3: beyond the profile's max
    out = engine(x)
    assert out.shape == (7, 1, 32, 32, 32) and out.is_cuda
    torch.testing.assert_close(out, TorchEngine(spec, device, "fp32")(x), atol=2e-2, rtol=0)
    plan.write_bytes(plan.read_bytes()[:-1])
    with pytest.raises(PlanRefusedError, match="bytes changed"):
        check_plan(plan, current_target())


@pytest.mark.slow
def test_swinunetr_exports_with_a_dynamic_batch(swin_model: Path, tmp_path: Path) -> None:
    """The architecture the project is about, once (about a minute on two cores)."""
    meta = export_onnx(load_model_spec(swin_model), tmp_path / "swin.onnx", check_batch=2)
    assert meta.max_abs_diff <= 1e-3 and meta.arch == "SwinUNETR"
