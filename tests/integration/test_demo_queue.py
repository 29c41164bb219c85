"""The shipped demo model segments fresh synthetic volumes through the whole queue path."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from tests.conftest import Stack
from tests.helpers import ROOT
from tests.integration.test_pipeline import segq

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DEMO_MODEL = ROOT / "models" / "demo" / "model.toml"


def test_demo_model_reaches_dice_floor_through_the_queue(stack: Stack, tmp_path: Path) -> None:
    if "postgres" in stack.env["SEGQ_DATABASE_URL"]:
        pytest.skip("database-independent; run once, on SQLite")
    data = tmp_path / "demo"
    segq("demo-data", "-o", str(data), "--count", "3", "--seed", "4242", env=stack.env)  # a seed training never used
    name = f"demo-{tmp_path.name}"
    segq("submit", str(data / "images"), "--out", str(tmp_path / "masks"), "--model", str(DEMO_MODEL),
         "--name", name, "--wait", "--timeout", "600", env=stack.env)
    scored = segq("evaluate", name, "--truth", str(data / "truth"), env=stack.env).stdout
    rows = json.loads(segq("results", name, "--format", "json", env=stack.env).stdout)
    assert len(rows) == 3 and all(r["status"] == "done" for r in rows), rows
    dice = [r["dice"] for r in rows]
    assert all(d is not None for d in dice)
    assert statistics.mean(dice) >= 0.85, f"mean Dice {statistics.mean(dice):.3f} below 0.85: {dice}"
    assert all(r["volume_error_ml"] is not None for r in rows)
    assert "mean Dice" in scored
