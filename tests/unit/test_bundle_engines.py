"""A bundle's network in segq's engines: weights forms, every channel out, ONNX export, the gate's decision."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from segq.errors import InputError
from segq.pipeline import load_pipeline
from tests.bundles import make_bundle, make_bundle_zip
from worker.engines.gate import decision
from worker.engines.model import load_model


@pytest.mark.parametrize("weights", ["state_dict", "checkpoint", "torchscript"])
def test_weights_forms_give_the_same_network(weights: str, tmp_path: Path) -> None:
    reference = load_model(load_pipeline(make_bundle("spleen", tmp_path / "ref")))
    bundle = make_bundle("spleen", tmp_path / weights, weights=weights)
    if weights == "torchscript":  # a bundle with both files runs model.pt (loaded weights_only)
        (bundle / "models" / "model.pt").unlink(missing_ok=True)
    spec = load_pipeline(bundle)
    assert spec.checkpoint.name == ("model.ts" if weights == "torchscript" else "model.pt")
    model = load_model(spec)
    x = torch.randn(2, 1, *spec.roi, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        out, ref = model(x), reference(x)
    assert out.shape == (2, 2, *spec.roi) and out.dtype == torch.float32  # every channel's logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_yaml_and_zip_read_as_the_json_folder(tmp_path: Path) -> None:
    folder = load_pipeline(make_bundle("btcv", tmp_path / "json"))
    yaml = load_pipeline(make_bundle("btcv", tmp_path / "yaml", fmt="yaml"))
    zipped = load_pipeline(make_bundle_zip(make_bundle("btcv", tmp_path / "zip")), unpack_into=tmp_path / "unpacked")
    for spec in (yaml, zipped):
        assert (spec.arch, spec.in_channels, spec.out_channels, spec.roi, spec.overlap, spec.sw_batch_size) == (
            folder.arch, folder.in_channels, folder.out_channels, folder.roi, folder.overlap, folder.sw_batch_size)
        assert spec.label_names() == folder.label_names() and len(spec.label_names()) == 14
    assert Path(zipped.bundle).is_relative_to(tmp_path / "unpacked")


def test_checksum_covers_config_and_weights(tmp_path: Path) -> None:
    bundle = make_bundle("spleen", tmp_path)
    before = load_pipeline(bundle).checksum()  # what a dataset records; a worker computes it again
    config = bundle / "configs" / "inference.json"
    document = json.loads(config.read_text())
    document["inferer"]["overlap"] = 0.25
    config.write_text(json.dumps(document))
    assert before != load_pipeline(bundle).checksum()
    assert load_pipeline(bundle).checksum() != load_pipeline(bundle, trust=True).checksum()


def test_weights_that_do_not_fit_are_refused_in_one_line(tmp_path: Path) -> None:
    bundle = make_bundle("spleen", tmp_path)
    other = make_bundle("prostate", tmp_path / "other")
    (bundle / "models" / "model.pt").write_bytes((other / "models" / "model.pt").read_bytes())
    with pytest.raises(InputError, match="does not fit the network") as caught:
        load_model(load_pipeline(bundle))
    assert "\n" not in str(caught.value)


def test_onnx_export_of_a_bundle_network(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from worker.engines.onnx_export import export_onnx, run_onnx_cpu

    spec = load_pipeline(make_bundle("spleen", tmp_path))
    meta = export_onnx(spec, tmp_path / "spleen.onnx", "fp32", check_batch=2)
    x = np.random.default_rng(0).normal(size=(1, 1, *spec.roi)).astype(np.float32)
    assert run_onnx_cpu(tmp_path / "spleen.onnx", x).shape == (1, 2, *spec.roi)
    assert meta.max_abs_diff < 1e-3


def test_gate_decides_label_maps_by_argmax() -> None:
    logits = np.zeros((3, 2, 2, 1), dtype=np.float32)
    logits[1, 0, 0, 0] = logits[2, 1, 1, 0] = 5.0
    assert decision(logits)[:, :, 0].tolist() == [[True, False], [False, True]]
    assert decision(np.array([0.2, 0.7], dtype=np.float32)).tolist() == [False, True]


def test_a_zip_member_outside_the_bundle_is_refused(tmp_path: Path) -> None:
    import zipfile

    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("evil/configs/inference.json", "{}")
        zf.writestr("../../outside.txt", "x")
    with pytest.raises(InputError, match="outside the bundle"):
        load_pipeline(archive, unpack_into=tmp_path / "into")
    assert not (tmp_path / "outside.txt").exists() and not list((tmp_path / "into").iterdir())
