"""model.toml parsing: what a user writes, and the errors that tell them what to fix."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from segq.errors import InputError
from segq.pipeline.toml import load_model_spec


def write(tmp_path: Path, text: str, checkpoint: bool = True) -> Path:
    if checkpoint:
        (tmp_path / "w.pt").write_bytes(b"weights")
    path = tmp_path / "model.toml"
    path.write_text(text)
    return path


BASE = 'arch = "SwinUNETR"\nin_channels = 4\nout_channels = 3\nfeature_size = 48\nroi_size = 96\n' \
       'target_class = 1\ncheckpoint = "w.pt"\n'


def test_defaults_and_relative_checkpoint(tmp_path: Path) -> None:
    spec = load_model_spec(write(tmp_path, BASE))
    assert spec.checkpoint == (tmp_path / "w.pt").resolve()
    assert (spec.overlap, spec.sw_batch_size, spec.mode, spec.preprocess) == (0.5, 8, "gaussian", "none")
    assert spec.roi == (96, 96, 96)


def test_command_line_overrides_win(tmp_path: Path) -> None:
    spec = load_model_spec(write(tmp_path, BASE + "overlap = 0.25\n")).with_overrides(0.6, 2, "constant")
    assert (spec.overlap, spec.sw_batch_size, spec.mode) == (0.6, 2, "constant")


def test_checksum_names_weights_and_config(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    first = load_model_spec(path).checksum()
    assert first == load_model_spec(path).checksum() and len(first) == 64
    (tmp_path / "w.pt").write_bytes(b"other weights")
    assert load_model_spec(path).checksum() != first


@pytest.mark.parametrize(("text", "message"), [
    (BASE.replace('"SwinUNETR"', '"ResNet"'), "arch = 'ResNet' is not one of"),
    (BASE.replace("target_class = 1", "target_class = 3"), "target_class = 3 must be within 0..2"),
    (BASE.replace("roi_size = 96", "roi_size = 32"), "roi_size >= 64"),
    (BASE.replace("roi_size = 96", "roi_size = 80"), "divisible by 32"),
    (BASE + "overlap = 1.0\n", "overlap must be in [0, 1)"),
    (BASE + 'mode = "median"\n', "mode = 'median'"),
    (BASE + 'preprocess = "minmax"\n', "preprocess = 'minmax'"),
    (BASE + "colour = 3\n", "unknown keys colour"),
    (BASE.replace('checkpoint = "w.pt"\n', ""), "lacks checkpoint"),
    ("arch = [", "not valid TOML"),
])
def test_bad_model_files_say_what_is_wrong(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(InputError, match=re.escape(message)):
        load_model_spec(write(tmp_path, text))


def test_missing_checkpoint_is_named(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="checkpoint .*w.pt does not exist"):
        load_model_spec(write(tmp_path, BASE, checkpoint=False))
