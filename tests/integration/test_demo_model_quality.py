"""The shipped demo model really segments: Dice on fresh synthetic volumes, through MONAI's sliding window."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
inferers = pytest.importorskip("monai.inferers")

from segq.demo import make_volume  # noqa: E402
from segq.metrics import dice  # noqa: E402
from segq.pipeline.toml import load_model_spec  # noqa: E402
from segq.preprocess import zscore_nonzero  # noqa: E402
from worker.engines.model import load_model  # noqa: E402

MODEL_FILE = Path(__file__).resolve().parents[2] / "models" / "demo" / "model.toml"
EVALUATION_SEED = 12345  # training uses SeedSequence(1) streams and the demo dataset seed 0: never this one
VOLUMES = 4
MIN_MEAN_DICE = 0.85


@pytest.mark.slow
def test_demo_model_segments_fresh_volumes() -> None:
    spec = load_model_spec(MODEL_FILE)
    assert spec.preprocess == "zscore"
    model = load_model(spec)
    torch.set_num_threads(2)
    rng = np.random.default_rng(EVALUATION_SEED)
    scores = []
    for _ in range(VOLUMES):
        image, truth, _ = make_volume(rng)
        x = torch.from_numpy(zscore_nonzero(image))[None, None]
        with torch.no_grad():
            prob = inferers.sliding_window_inference(x, spec.roi, spec.sw_batch_size, model,
                                                     overlap=spec.overlap, mode=spec.mode)
        assert prob.shape == (1, 1, *image.shape)
        scores.append(dice(prob[0, 0].numpy() >= 0.5, truth))
    assert float(np.mean(scores)) >= MIN_MEAN_DICE, f"per-volume Dice {[round(s, 3) for s in scores]}"
