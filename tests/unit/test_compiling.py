"""The choice of compile mode, as a plain function of the installed PyTorch's features and of the network, and the
blocks regional compilation compiles."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from segq.modelspec import ModelSpec
from worker.engines import compiling
from worker.engines.compiling import CompileChoice, TorchFeatures, choose, repeated_blocks
from worker.engines.model import TargetClassProbability, build_network

ALL = TorchFeatures("2.13.0", aot_compile=True, aot_inductor=True, module_compile=True)
TORCH_2_11 = TorchFeatures("2.11.0+cu130", aot_compile=False, aot_inductor=True, module_compile=True)
OLD = TorchFeatures("2.1.0", aot_compile=False, aot_inductor=False, module_compile=False)


def _blocks(count: int) -> object:
    return lambda: count


@pytest.mark.parametrize(
    ("requested", "features", "blocks", "expected"),
    [
        (None, ALL, 19, None),
        ("auto", ALL, 19, "regional"),  # SwinUNETR: the measured winner (9.9 s from the cache against 66 s)
        ("auto", ALL, 0, "default"),  # a network with no known repeated blocks: compiled whole
        ("auto", ALL, 1, "default"),
        ("auto", OLD, 19, "default"),  # no nn.Module.compile: whole network
        ("regional", ALL, 19, "regional"),
        ("default", ALL, 19, "default"),
        ("reduce-overhead", ALL, 19, "reduce-overhead"),
        ("precompile", ALL, 19, "precompile"),
        ("precompile", TORCH_2_11, 19, "regional"),  # the GPU machine's PyTorch: falls back to what auto picks
        ("precompile", TORCH_2_11, 0, "default"),
        ("aot", ALL, 19, "aot"),
        ("aot", OLD, 19, "default"),
    ],
)
def test_the_mode_follows_the_installed_torch_and_the_network(
    requested: str | None, features: TorchFeatures, blocks: int, expected: str | None
) -> None:
    assert choose(requested, features, _blocks(blocks)).mode == expected  # type: ignore[arg-type]


def test_a_missing_api_is_named_in_one_line_with_what_runs_instead() -> None:
    choice = choose("precompile", TORCH_2_11, _blocks(19))  # type: ignore[arg-type]
    assert choice == CompileChoice("regional", choice.note)
    assert choice.note is not None and "\n" not in choice.note
    assert "SEGQ_TORCH_COMPILE=precompile needs aot_compile" in choice.note and "2.11.0+cu130" in choice.note
    assert "regional" in choice.note
    assert choose("auto", ALL, _blocks(19)).note is None and choose("default", ALL, _blocks(0)).note is None
    regional = choose("regional", ALL, _blocks(0)).note  # type: ignore[arg-type]
    assert regional is not None and "whole network instead" in regional


def test_an_aot_package_needs_no_network_to_choose() -> None:
    def no_network() -> int:
        raise AssertionError("the network was built only to choose")

    assert choose("aot", ALL, no_network).mode == "aot"
    assert choose("precompile", ALL, no_network).mode == "precompile"
    assert choose("default", ALL, no_network).mode == "default"


def test_the_installed_torch_is_detected_once() -> None:
    features = TorchFeatures.installed()
    assert features is TorchFeatures.installed()
    assert features.version == torch.__version__
    assert features.module_compile is hasattr(nn.Module, "compile")
    assert features.aot_compile is hasattr(torch.compile(lambda x: x), "aot_compile")


def _spec(arch: str, **kwargs: object) -> ModelSpec:
    return ModelSpec(
        arch,
        1,
        2,
        64 if arch == "SwinUNETR" else 32,
        1,
        checkpoint=Path("unused"),  # type: ignore[arg-type]
        feature_size=12 if arch == "SwinUNETR" else 8,
        **kwargs,
    )


def test_swinunetr_compiles_its_transformer_blocks_and_its_encoder_and_decoder_blocks() -> None:
    network = build_network(_spec("SwinUNETR"))
    names = [type(block).__name__ for block in repeated_blocks(TargetClassProbability(network, 1, 2))]
    assert names.count("SwinTransformerBlock") == 8  # depths (2, 2, 2, 2)
    assert names.count("UnetrBasicBlock") == 5 and names.count("UnetrUpBlock") == 5 and names.count("UnetOutBlock") == 1
    assert len(names) == 19


def test_unet_and_segresnet_compile_their_outermost_units_and_an_unknown_network_none() -> None:
    unet = repeated_blocks(build_network(_spec("UNet")))
    kinds = {type(block).__name__ for block in unet}
    assert kinds <= {"ResidualUnit", "Convolution"} and len(unet) >= 4
    inner = {id(m) for block in unet for m in block.modules() if m is not block}
    assert not any(id(block) in inner for block in unet), "a block inside another block is compiled with it"
    segres = repeated_blocks(build_network(_spec("SegResNet")))
    assert segres and {type(block).__name__ for block in segres} == {"ResBlock"}
    assert repeated_blocks(nn.Sequential(nn.Conv3d(1, 1, 3), nn.ReLU())) == []


def test_regional_compile_raises_dynamos_limit_to_the_most_blocks_of_one_class(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past recompile_limit graphs of one code object dynamo runs it eager with only a warning: 8 Swin blocks of
    4 shapes and 2 shifts would just fit the default of 8; the limit is made to fit whatever the network has."""
    import torch._dynamo

    compiled: list[nn.Module] = []
    monkeypatch.setattr(nn.Module, "compile", lambda self, **kwargs: compiled.append(self))
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 8)
    blocks = [nn.Linear(2, 2) for _ in range(12)] + [nn.ReLU()]
    assert compiling.compile_regions(blocks, {"comprehensive_padding": False}) == 13
    assert compiled == blocks and torch._dynamo.config.recompile_limit == 12


def test_precompile_on_a_torch_without_aot_compile_falls_back_with_one_line_and_does_not_crash(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """What SEGQ_TORCH_COMPILE=precompile did on the GPU machine's PyTorch 2.11 was an AttributeError; now the
    engine compiles regionally and says why, once however many engines the process builds."""
    from worker.engines.torch_engine import TorchEngine

    compiled: list[str] = []
    monkeypatch.setattr(nn.Module, "compile", lambda self, **kwargs: compiled.append(type(self).__name__))
    monkeypatch.setattr(compiling, "_noted", set())
    spec = _spec("UNet", sw_batch_size=2)
    torch.manual_seed(0)
    with caplog.at_level(logging.INFO, logger="segq.engine.compile"):
        for _ in range(2):
            model = TargetClassProbability(build_network(spec), 1, 2).eval()
            engine = TorchEngine(
                spec, torch.device("cpu"), "fp32", "precompile", model=model, engine_root=tmp_path, features=TORCH_2_11
            )
            assert engine.compile_mode == "regional" and engine.package is None
    lines = [r.getMessage() for r in caplog.records if "needs aot_compile" in r.getMessage()]
    assert len(lines) == 1 and "PyTorch 2.11.0+cu130 lacks" in lines[0]
    assert compiled and set(compiled) <= {"ResidualUnit", "Convolution"}
    out = engine(torch.randn(3, 1, 32, 32, 32))  # nn.Module.compile was a no-op here: eager numbers
    assert out.shape == (3, 1, 32, 32, 32)


@pytest.mark.parametrize(
    ("setting", "precision", "device", "expected"),
    [
        ("auto", "fp16", "cuda", "auto"),
        ("auto", "fp32", "cuda", None),
        ("auto", "fp32", "cpu", None),
        ("regional", "fp32", "cpu", "regional"),
        ("off", "fp16", "cuda", None),
    ],
)
def test_auto_compiles_fp16_on_a_gpu_and_leaves_regional_or_whole_to_the_engine(
    setting: str, precision: str, device: str, expected: str | None
) -> None:
    from worker.engines import compile_mode

    assert compile_mode(setting, precision, torch.device(device)) == expected


def test_aot_compile_behind_dynamos_flag_counts_as_present(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where torch.compile gives ``aot_compile`` only with ``enable_aot_compile`` on (off by default in some
    releases), the feature is there: the engine switches the flag on for its build and load."""
    import torch._dynamo

    if not hasattr(torch._dynamo.config, "enable_aot_compile"):
        pytest.skip(f"PyTorch {torch.__version__} has no enable_aot_compile flag")
    monkeypatch.setattr(torch._dynamo.config, "enable_aot_compile", False)
    assert not hasattr(torch.compile(lambda x: x), "aot_compile")
    compiling._installed.cache_clear()
    try:
        assert TorchFeatures.installed().aot_compile is hasattr(torch.compiler, "load_compiled_function")
        assert torch._dynamo.config.enable_aot_compile is False, "switched on only while it is used"
    finally:
        compiling._installed.cache_clear()


def test_a_precompile_that_fails_falls_back_with_one_line_instead_of_stopping_the_worker(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    from segq.errors import EngineRefusedError
    from worker.engines import aot
    from worker.engines.torch_engine import TorchEngine

    def refused(*args: object, **kwargs: object) -> None:
        raise EngineRefusedError("the compiled network x cannot be used: the process that loaded it died of SIGSEGV")

    monkeypatch.setattr(aot, "ensure", refused)
    monkeypatch.setattr(nn.Module, "compile", lambda self, **kwargs: None)
    monkeypatch.setattr(compiling, "_noted", set())
    spec = _spec("UNet", sw_batch_size=2)
    model = TargetClassProbability(build_network(spec), 1, 2).eval()
    with caplog.at_level(logging.WARNING, logger="segq.engine.compile"):
        engine = TorchEngine(
            spec,
            torch.device("cpu"),
            "fp32",
            "precompile",
            model=model,
            engine_root=tmp_path,
            features=ALL,
            model_sha256="ab" * 32,
        )
    assert engine.compile_mode == "regional" and engine.package is None and engine.static is not None
    (line,) = [r.getMessage() for r in caplog.records]
    assert "precompile did not work with PyTorch 2.13.0" in line and "died of SIGSEGV" in line
    assert engine(torch.randn(1, 1, 32, 32, 32)).shape == (1, 1, 32, 32, 32)
