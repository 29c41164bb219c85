"""Engine wiring that needs neither TensorRT nor a GPU: profiles, partial batches, plan names and refusal,
providers, preflight, the compiled engine's static batch and the accuracy gate."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from segq.errors import EngineError
from segq.modelspec import ModelSpec
from segq.settings import Settings
from worker.engines import create_engine
from worker.engines.gate import check_accuracy, compare_masks, dice, reference_volume
from worker.engines.model import TargetClassProbability, build_network
from worker.engines.ort_engine import choose_providers
from worker.engines.plans import (
    PlanMeta,
    PlanRefusedError,
    PlanTarget,
    Profile,
    check_plan,
    chunk_batch,
    io_names,
    plan_name,
    plans_for,
    sidecar_path,
    slug,
    write_plan,
)
from worker.engines.torch_engine import TorchEngine, use_fused_attention
from worker.engines.trt_build import network_flags, precision_plan
from worker.preflight import preflight, serves_gpu_queue

H100 = PlanTarget("NVIDIA H100 80GB HBM3", "9.0", "10.3.0")


@pytest.mark.parametrize(("n", "profile", "expected"), [
    (0, Profile(1, 8, 16), []),
    (5, Profile(1, 8, 16), [(0, 5, 5)]),
    (16, Profile(1, 8, 16), [(0, 16, 16)]),
    (35, Profile(1, 8, 16), [(0, 16, 16), (16, 32, 16), (32, 35, 3)]),
    (18, Profile(4, 8, 8), [(0, 8, 8), (8, 16, 8), (16, 18, 4)]),  # last chunk padded up to the profile's min
    (2, Profile(4, 4, 4), [(0, 2, 4)]),
])
def test_chunk_batch_stays_inside_the_profile(n: int, profile: Profile, expected: list[tuple[int, int, int]]) -> None:
    chunks = chunk_batch(n, profile)
    assert chunks == expected
    assert all(profile.min <= size <= profile.max and hi - lo <= size for lo, hi, size in chunks)
    assert sum(hi - lo for lo, hi, _ in chunks) == n


def test_profile_shapes_and_validation() -> None:
    assert Profile(1, 8, 16).shapes((1, 96, 96, 96)) == ((1, 1, 96, 96, 96), (8, 1, 96, 96, 96), (16, 1, 96, 96, 96))
    with pytest.raises(EngineError, match="min <= opt <= max"):
        Profile(8, 4, 16)
    with pytest.raises(EngineError, match="min <= opt <= max"):
        Profile(0, 1, 1)


def test_plan_name_records_model_gpu_trt_precision_and_profile() -> None:
    name = plan_name("ab" * 32, H100, "fp16", Profile(1, 8, 16))
    assert name == "model-abababababab_nvidia-h100-80gb-hbm3_sm90_trt10.3.0_fp16_b1-8-16.plan"
    assert plan_name("ab" * 32, H100, "fp16", Profile(1, 8, 16)) == name
    assert plan_name("ab" * 32, PlanTarget("NVIDIA A100-SXM4-40GB", "8.0", "10.3.0"), "fp16", Profile()) != name
    assert slug("  Tesla T4 / PCIe ") == "tesla-t4-pcie"
    with pytest.raises(EngineError, match="fp32 or fp16"):
        plan_name("ab" * 32, H100, "bf16", Profile())


def _plan(tmp_path: Path, target: PlanTarget = H100) -> Path:
    plan = tmp_path / plan_name("cd" * 32, target, "fp16", Profile())
    meta = PlanMeta(onnx_sha256="ef" * 32, plan_sha256="", gpu_name=target.gpu_name,
                    compute_capability=target.compute_capability, trt_version=target.trt_version, precision="fp16",
                    profile={"min": 1, "opt": 8, "max": 16}, model_sha256="cd" * 32)
    write_plan(plan, b"serialized engine bytes", meta)
    return plan


def test_a_plan_loads_on_the_gpu_and_trt_it_was_built_for(tmp_path: Path) -> None:
    plan = _plan(tmp_path)
    meta = check_plan(plan, H100)
    assert meta.plan_sha256 and meta.precision == "fp16" and sidecar_path(plan).is_file()
    assert check_plan(plan, H100, onnx_sha256="ef" * 32).onnx_sha256 == "ef" * 32
    assert plans_for(tmp_path, H100) == [plan]
    assert plans_for(tmp_path, PlanTarget("NVIDIA L4", "8.9", "10.3.0")) == []


@pytest.mark.parametrize(("target", "reason"), [
    (PlanTarget("NVIDIA A100-SXM4-80GB", "8.0", "10.3.0"), "built for GPU 'NVIDIA H100 80GB HBM3'"),
    (PlanTarget("NVIDIA H100 80GB HBM3", "9.0", "10.8.0"), "built with TensorRT 10.3.0, this process has 10.8.0"),
    (PlanTarget("NVIDIA H100 80GB HBM3", "8.9", "10.3.0"), "compute capability 9.0"),
])
def test_a_plan_for_another_gpu_or_trt_is_refused_with_the_rebuild_command(tmp_path: Path, target: PlanTarget,
                                                                          reason: str) -> None:
    plan = _plan(tmp_path)
    with pytest.raises(PlanRefusedError, match="refusing TensorRT plan") as info:
        check_plan(plan, target)
    assert reason in str(info.value)
    assert "segq build-engine --onnx <model.onnx> --fp16 --min-batch 1 --opt-batch 8 --max-batch 16" in str(info.value)


def test_a_tampered_missing_or_unexplained_plan_is_refused(tmp_path: Path) -> None:
    plan = _plan(tmp_path)
    plan.write_bytes(plan.read_bytes() + b"!")
    with pytest.raises(PlanRefusedError, match="bytes changed since the build"):
        check_plan(plan, H100)
    with pytest.raises(PlanRefusedError, match="another ONNX file"):
        check_plan(_plan(tmp_path / "b"), H100, onnx_sha256="00" * 32)
    sidecar_path(plan).unlink()
    with pytest.raises(PlanRefusedError, match="sidecar .* is missing"):
        check_plan(plan, H100)
    with pytest.raises(PlanRefusedError, match="does not exist"):
        check_plan(tmp_path / "nope.plan", H100)


def test_io_names_need_one_input_and_one_output() -> None:
    assert io_names([("probability", False), ("input", True)]) == ("input", "probability")
    with pytest.raises(EngineError, match="one input and one output"):
        io_names([("a", True), ("b", True), ("c", False)])


def _fake_trt(version: str, strongly_typed: bool = True) -> SimpleNamespace:
    flags = SimpleNamespace(EXPLICIT_BATCH=0, **({"STRONGLY_TYPED": 1} if strongly_typed else {}))
    return SimpleNamespace(__version__=version, NetworkDefinitionCreationFlag=flags)


def test_network_flags_set_explicit_batch_only_before_trt10() -> None:
    assert network_flags(_fake_trt("8.6.1"), strongly_typed=False) == 1
    assert network_flags(_fake_trt("10.3.0"), strongly_typed=False) == 0
    assert network_flags(_fake_trt("10.3.0"), strongly_typed=True) == 2
    assert network_flags(_fake_trt("11.1.0", strongly_typed=False), strongly_typed=True) == 0


def test_precision_plan_uses_the_fp16_flag_or_an_fp16_graph() -> None:
    assert precision_plan("fp32", "fp16", has_fp16_flag=True) == (False, True)  # TensorRT 10: weak typing
    assert precision_plan("fp16", "fp16", has_fp16_flag=False) == (True, False)  # TensorRT 11: strongly typed
    assert precision_plan("fp32", "fp32", has_fp16_flag=False) == (True, False)
    with pytest.raises(EngineError, match="segq export-onnx --precision fp16"):
        precision_plan("fp32", "fp16", has_fp16_flag=False)
    with pytest.raises(EngineError, match="fp32 or fp16"):
        precision_plan("fp32", "bf16", has_fp16_flag=True)


def test_onnxruntime_providers() -> None:
    cpu_only = ["AzureExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers(cpu_only, "cuda", 0, "fp32") == ["CPUExecutionProvider"]
    assert choose_providers(["CUDAExecutionProvider", "CPUExecutionProvider"], "cuda", 1, "fp16") == [
        ("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]
    assert choose_providers(["CUDAExecutionProvider", "CPUExecutionProvider"], "cpu", 0, "fp32") == [
        "CPUExecutionProvider"]
    with pytest.raises(EngineError, match="pip install onnxruntime-gpu"):
        choose_providers(cpu_only, "cuda", 0, "fp16")
    with pytest.raises(EngineError, match="fp32 or fp16"):
        choose_providers(cpu_only, "cpu", 0, "bf16")


def test_unknown_backend_is_refused() -> None:
    spec = ModelSpec("UNet", 1, 2, 16, 1, checkpoint=Path("unused"), feature_size=4)
    with pytest.raises(EngineError, match="is not one of torch, onnxruntime, tensorrt"):
        create_engine(spec, "openvino", "fp32", torch.device("cpu"), settings=Settings())


def test_preflight_skips_coordinator_workers_and_refuses_missing_pieces(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    assert serves_gpu_queue(None) and serves_gpu_queue("gpu.high,gpu,gpu.low")
    assert not serves_gpu_queue("coordinator,coordinator.low")
    preflight(Settings(backend="tensorrt"), "coordinator")  # a CPU coordinator needs no engine
    with pytest.raises(EngineError, match="SEGQ_PRECISION=fp16 needs a CUDA GPU but SEGQ_DEVICE=cpu"):
        preflight(Settings(precision="fp16", device="cpu"), "gpu")
    import worker.preflight as pf

    probe: dict[str, object] = {"cuda": True, "name": "NVIDIA H100 80GB HBM3", "capability": "9.0",
                                "trt_error": "No module named 'tensorrt'"}
    monkeypatch.setattr(pf, "probe_gpu", lambda device: probe)
    with pytest.raises(EngineError, match="TensorRT.*not installed.*pip install tensorrt"):
        preflight(Settings(backend="tensorrt", precision="fp16"), "gpu")
    probe.pop("trt_error")
    probe["trt"] = "10.3.0"
    settings = Settings(backend="tensorrt", precision="fp16", engine_build=False, engine_dir=tmp_path)
    with pytest.raises(EngineError, match=r"no TensorRT plan for NVIDIA H100 80GB HBM3 .* `segq build-engine`"):
        preflight(settings, "gpu")
    _plan(tmp_path / "model")
    preflight(settings, "gpu")
    probe["cuda"] = False
    with pytest.raises(EngineError, match="SEGQ_BACKEND=tensorrt needs a CUDA GPU and none is visible"):
        preflight(Settings(backend="tensorrt"), None)


def _unet(roi: int = 16) -> tuple[ModelSpec, TargetClassProbability]:
    spec = ModelSpec("UNet", 1, 2, roi, 1, checkpoint=Path("unused"), feature_size=4, sw_batch_size=4)
    torch.manual_seed(0)
    return spec, TargetClassProbability(build_network(spec), 1, 2).eval()


@pytest.mark.parametrize("n", [1, 4, 7, 9])
def test_compiled_torch_engine_pads_and_splits_to_its_one_batch_size(n: int, monkeypatch: pytest.MonkeyPatch) -> None:
    spec, model = _unet()
    seen: list[int] = []

    def fake_compile(module: torch.nn.Module, **kwargs: object) -> torch.nn.Module:
        def run(x: torch.Tensor) -> torch.Tensor:
            seen.append(x.shape[0])
            return module(x)
        return run  # type: ignore[return-value]

    monkeypatch.setattr(torch, "compile", fake_compile)
    engine = TorchEngine(spec, torch.device("cpu"), "fp32", "default", model=model)
    x = torch.randn(n, 1, 16, 16, 16)
    out = engine(x)
    assert out.shape == (n, 1, 16, 16, 16) and out.dtype == torch.float32
    assert set(seen) == {4}
    with torch.inference_mode():
        np.testing.assert_allclose(out.numpy(), model(x).numpy(), atol=1e-6)


def test_fused_attention_switch_finds_swin_attention_only() -> None:
    _spec, unet = _unet()
    assert use_fused_attention(unet) == 0
    swin = build_network(ModelSpec("SwinUNETR", 1, 2, 64, 1, checkpoint=Path("unused"), feature_size=12))
    assert use_fused_attention(swin) == 8


def test_dice_and_agreement() -> None:
    a = np.zeros((4, 4, 4), bool)
    b = a.copy()
    assert dice(a, b) == 1.0
    a[0, 0, :2] = True
    b[0, 0, 1:3] = True
    result = compare_masks(a, b)
    assert result.dice == pytest.approx(0.5) and result.agreement == pytest.approx(62 / 64)


class _Engine:
    backend, precision, device = "test", "fp32", torch.device("cpu")

    def __init__(self, module: torch.nn.Module, invert: bool = False) -> None:
        self.module, self.invert = module, invert

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        out = self.module(batch)
        return 1 - out if self.invert else out


def test_accuracy_gate_passes_an_equal_engine_and_refuses_a_wrong_one_with_the_figure() -> None:
    spec, model = _unet()
    volume = reference_volume(spec)
    assert volume.shape == (1, 24, 24, 24)
    assert check_accuracy(_Engine(model), _Engine(model), spec, volume).dice == 1.0
    with pytest.raises(EngineError, match=r"accuracy gate refused the test fp32 engine: Dice 0\.\d+"):
        check_accuracy(_Engine(model, invert=True), _Engine(model), spec, volume)


def test_the_step_owns_the_batch_and_a_fixed_batch_engine_is_kept_per_batch(tmp_path: Path) -> None:
    """A compiled engine fixes its batch: each batch size (a later dataset's, a halved retry's) gets its own;
    an eager engine takes any batch and is shared."""
    from segq.pipeline.toml import load_model_spec
    from tests.helpers import write_model
    from worker import runtime

    toml = write_model(tmp_path / "m", "UNet", roi=32, feature_size=4, sw_batch_size=4)
    spec = load_model_spec(toml)
    model, sha = spec.to_dict(), spec.checksum()
    runtime.clear()
    try:
        eager = Settings(backend="torch", precision="fp32", device="cpu")
        spec_a, a = runtime.engine_for(model, sha, eager)
        spec_b, b = runtime.engine_for(model, sha, eager, batch_size=2)
        assert a is b and (spec_a.sw_batch_size, spec_b.sw_batch_size) == (4, 2)
        compiled = Settings(backend="torch", precision="fp32", device="cpu", torch_compile="default")
        _, c4 = runtime.engine_for(model, sha, compiled)
        _, c2 = runtime.engine_for(model, sha, compiled, batch_size=2)
        assert c4 is not c2 and runtime.engine_for(model, sha, compiled, batch_size=4)[1] is c4
        assert isinstance(c2, TorchEngine) and c2.static is not None and c2.static.opt == 2
    finally:
        runtime.clear()


@pytest.mark.parametrize("mode", [None, "default", "reduce-overhead", "max-autotune-no-cudagraphs"])
def test_every_compile_mode_turns_comprehensive_padding_off(mode: str | None) -> None:
    """Inductor's padded strides broke the compiled fused window attention (bench/compile_check.py)."""
    from worker.engines.torch_engine import compile_options

    options = compile_options(mode)
    assert options["comprehensive_padding"] is False
    assert options.get("triton.cudagraphs", False) is (mode == "reduce-overhead")
    assert options.get("max_autotune", False) is (mode == "max-autotune-no-cudagraphs")
    with pytest.raises(EngineError, match="is not one of default, reduce-overhead"):
        compile_options("max-autotune")


@pytest.mark.parametrize(("setting", "expected"), [("1", "default"), ("true", "default"), ("0", "off"),
                                                  ("false", "off"), ("auto", "auto"),
                                                  ("reduce-overhead", "reduce-overhead")])
def test_segq_torch_compile_takes_switches_and_mode_names(setting: str, expected: str) -> None:
    assert Settings(torch_compile=setting).torch_compile == expected


def test_segq_torch_compile_refuses_an_unknown_mode() -> None:
    with pytest.raises(ValueError, match="torch_compile"):
        Settings(torch_compile="turbo")


def test_a_mixed_precision_engine_is_gated_at_load_and_a_refusal_ends_the_worker_for_good(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 on the CPU is a mixed mode: the engine is checked against fp32 eager before it is kept. A refusal
    is EngineRefusedError, whose exit code (78) tells the launcher not to restart the worker."""
    from segq.errors import EngineRefusedError
    from segq.pipeline.toml import load_model_spec
    from tests.helpers import write_model
    from worker import runtime
    from worker.engines import verdicts

    toml = write_model(tmp_path / "m", "UNet", roi=32, feature_size=4, sw_batch_size=4)
    spec = load_model_spec(toml)
    model, sha = spec.to_dict(), spec.checksum()
    settings = Settings(backend="torch", precision="bf16", device="cpu", broker_url="redis://127.0.0.1:1/0",
                        engine_dir=tmp_path / "engines")
    calls: list[str] = []
    real = verdicts.check_mask

    def counted(candidate: object, *args: object, **kwargs: object) -> object:
        calls.append(f"{candidate.precision} vs fp32")  # type: ignore[attr-defined]
        return real(candidate, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(verdicts, "check_mask", counted)
    runtime.clear()
    try:
        runtime.engine_for(model, sha, settings)
        assert calls == ["bf16 vs fp32"]
        runtime.engine_for(model, sha, Settings(backend="torch", precision="fp32", device="cpu"))
        assert calls == ["bf16 vs fp32"], "fp32 eager is the reference itself: no gate"
        runtime.clear()
        with pytest.raises(EngineRefusedError, match="accuracy gate refused the torch bf16 engine"):
            runtime.engine_for(model, sha, settings.model_copy(update={"gate_min_dice": 1.01}))
    finally:
        runtime.clear()
    from segq.names import EXIT_CONFIG
    from worker.steps import Outcome, outcome

    assert outcome(EngineRefusedError("x")) is Outcome.EXIT and EXIT_CONFIG == 78
