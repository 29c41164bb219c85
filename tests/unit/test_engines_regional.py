"""A real regional compile on the CPU: a tiny SwinUNETR's Swin blocks and encoder/decoder blocks compiled one by
one by inductor (its C++ backend), through the worker's own start; its masks match eager and it passes the gate."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from segq.pipeline.toml import load_model_spec
from segq.settings import Settings
from tests.helpers import write_model
from worker import runtime
from worker.engines.compiling import repeated_blocks
from worker.engines.torch_engine import TorchEngine

pytestmark = pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None,
    reason="torch.compile on a CPU builds C++ with inductor: no C++ compiler (g++) on this machine",
)


def test_a_regionally_compiled_swinunetr_matches_eager_and_passes_the_gate(tmp_path: Path) -> None:
    """Minutes on two loaded cores (19 graphs, each a C++ build): the one real regional compile in the suite."""
    toml = write_model(tmp_path / "m", "SwinUNETR", roi=64, feature_size=12, sw_batch_size=2)
    spec = load_model_spec(toml)
    model, sha = spec.to_dict(), spec.checksum()
    settings = Settings(
        backend="torch", precision="fp32", device="cpu", torch_compile="regional", engine_dir=tmp_path / "engines"
    )
    runtime.clear()
    try:
        spec, engine = runtime.engine_for(model, sha, settings)
        assert isinstance(engine, TorchEngine) and engine.compile_mode == "regional"
        blocks = repeated_blocks(engine.model)  # type: ignore[arg-type]
        assert len(blocks) == 19 and all(getattr(b, "_compiled_call_impl", None) is not None for b in blocks)
        clock = runtime.last_start(sha, settings, spec.sw_batch_size)
        assert clock is not None and clock.notes["gate_verdict"] == "ran"
        assert float(clock.notes["gate_dice"]) >= settings.gate_min_dice
        assert {"network build", "checkpoint load", "compile", "first call", "gate"} <= set(clock.seconds)
        assert any(p.name.startswith("verdict-") for p in (settings.engine_root / sha[:16] / "gate").iterdir())
        assert any((settings.engine_root / "inductor").iterdir()), "inductor's cache is kept under the engine dir"

        torch.manual_seed(0)
        x = torch.randn(3, 1, 64, 64, 64)  # not the compiled batch: padded and split to 2
        eager = TorchEngine(spec, torch.device("cpu"), "fp32")
        torch.testing.assert_close(engine(x), eager(x), atol=1e-4, rtol=0)
    finally:
        runtime.clear()
