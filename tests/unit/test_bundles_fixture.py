"""tests/bundles.py is a meaningful oracle: real zoo configs made tiny, and MONAI's own runner labels its cases."""

from __future__ import annotations

import json
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from tests import bundles
from tests.bundles import SHAPES, make_bundle, make_bundle_zip, make_case, run_bundle_oracle

MIRROR = Path("/work/.mirror/Project-MONAI+model-zoo/repo")

# The only leaves of each real inference.json that tiny_inference_config changes (path -> new value; None: removed).
CHANGES: dict[str, dict[tuple[Any, ...], Any]] = {
    "spleen": {("network_def", "channels"): [4, 8, 16], ("network_def", "strides"): [2, 2],
               ("inferer", "roi_size"): [32, 32, 32]},
    "btcv": {("network_def", "feature_size"): 12, ("network_def", "img_size"): None,
             ("preprocessing", "transforms", 0, "reader"): None, ("inferer", "roi_size"): [64, 64, 64]},
    "brats": {("network_def", "init_filters"): 8, ("network_def", "blocks_down"): [1, 1, 1],
              ("network_def", "blocks_up"): [1, 1], ("inferer", "roi_size"): [32, 32, 16]},
    "wholebody": {("network_def", "init_filters"): 8, ("network_def", "blocks_down"): [1, 1, 1],
                  ("network_def", "blocks_up"): [1, 1], ("inferer", "roi_size"): [32, 32, 32]},
    "prostate": {("network_def", "channels"): [4, 8, 16], ("network_def", "strides"): [2, 2],
                 ("network_def", "num_res_units"): 1, ("inferer", "roi_size"): [32, 32, 32],
                 ("imports",): ["$import csv", "$import os"],
                 ("datalist",): "$list(@dataset_dir + r['t2'] for r in csv.DictReader(open(@dataset_dir + "
                                "'test.csv')))"},
}
LABELS = {"spleen": 2, "btcv": 14, "brats": 5, "wholebody": 105, "prostate": 3}  # brats writes 0, 1, 2, 4


def _leaves(tree: Any, path: tuple[Any, ...] = ()) -> dict[tuple[Any, ...], Any]:
    """Lists of scalars are leaves; dicts and other lists are walked."""
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _leaves(sub, (*path, key)).items()}
    if isinstance(tree, list) and any(isinstance(x, dict | list) for x in tree):
        return {k: v for i, sub in enumerate(tree) for k, v in _leaves(sub, (*path, i)).items()}
    return {path: tree}


@pytest.mark.parametrize("shape", SHAPES)
def test_tiny_config_changes_only_what_the_docstring_says(shape: str) -> None:
    real, tiny = _leaves(bundles.real_inference_config(shape)), _leaves(bundles.tiny_inference_config(shape))
    expected = {**CHANGES[shape], ("dataloader", "num_workers"): 0}
    changed = {p: tiny.get(p) for p in real.keys() | tiny.keys() if real.get(p, "<absent>") != tiny.get(p, None)}
    assert changed == expected
    meta = bundles.real_metadata(shape)
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert len(pred["channel_def"]) == pred["num_channels"] == bundles.tiny_inference_config(shape)[
        "network_def"]["out_channels"]


@pytest.mark.skipif(not MIRROR.is_dir(), reason="no mirror of Project-MONAI/model-zoo on this machine")
@pytest.mark.parametrize("shape", SHAPES)
def test_embedded_configs_are_the_zoos(shape: str) -> None:
    for name, embedded in (("inference.json", bundles.real_inference_config(shape)),
                           ("metadata.json", bundles.real_metadata(shape))):
        text = subprocess.run(["git", "-C", str(MIRROR), "show",
                               f"{bundles.ZOO_COMMIT}:models/{bundles.ZOO_NAMES[shape]}/configs/{name}"],
                              capture_output=True, text=True, check=True).stdout
        assert json.loads(text) == embedded


def test_bundle_layout_yaml_and_zip(tmp_path: Path) -> None:
    import torch
    from monai.bundle import ConfigParser

    as_json = make_bundle("spleen", tmp_path / "j")
    as_yaml = make_bundle("spleen", tmp_path / "y", fmt="yaml")
    assert sorted(str(p.relative_to(as_json)) for p in as_json.rglob("*") if p.is_file()) == [
        "configs/inference.json", "configs/logging.conf", "configs/metadata.json", "models/model.pt"]
    parsed = []
    for path in (as_json / "configs" / "inference.json", as_yaml / "configs" / "inference.yaml"):
        parser = ConfigParser()
        parser.read_config(str(path))
        parsed.append(parser.get())
    assert parsed[0] == parsed[1]
    assert {k: v for k, v in parsed[0].items() if k != "_meta_"} == bundles.tiny_inference_config("spleen")
    assert json.loads((as_json / "configs" / "metadata.json").read_text()) == bundles.real_metadata("spleen")

    state = torch.load(as_json / "models" / "model.pt", weights_only=True)
    again = torch.load(as_yaml / "models" / "model.pt", weights_only=True)
    assert state.keys() == again.keys() and all(torch.equal(state[k], again[k]) for k in state)
    checkpoint = torch.load(make_bundle("spleen", tmp_path / "c", weights="checkpoint") / "models" / "model.pt",
                            weights_only=True)
    assert list(checkpoint) == ["model"] and all(torch.equal(state[k], checkpoint["model"][k]) for k in state)
    scripted_dir = make_bundle("spleen", tmp_path / "t", weights="torchscript")
    scripted = torch.jit.load(str(scripted_dir / "models" / "model.ts"))
    net = ConfigParser(bundles.tiny_inference_config("spleen")).get_parsed_content("network_def")
    net.load_state_dict(state)
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.allclose(scripted(x), net.eval()(x), atol=1e-5)
    assert (net.eval()(x).argmax(1).unique().numel() >= 2)  # the calibrated final layer: not one class everywhere
    with pytest.raises(ValueError, match="script"):
        make_bundle("btcv", tmp_path / "t", weights="torchscript")

    archive = make_bundle_zip(as_json)
    assert archive == as_json.with_name("spleen_bundle.zip")
    assert sorted(zipfile.ZipFile(archive).namelist()) == [
        "spleen_bundle/configs/inference.json", "spleen_bundle/configs/logging.conf",
        "spleen_bundle/configs/metadata.json", "spleen_bundle/models/model.pt"]


@pytest.mark.parametrize("orientation", ["LPS", "RAS", "oblique"])
def test_cases(tmp_path: Path, orientation: str) -> None:
    ct = make_case("spleen", tmp_path, "ct", orientation=orientation)
    mr = make_case("prostate", tmp_path, "mr", orientation=orientation)
    brats = make_case("brats", tmp_path, "br", orientation=orientation)
    assert [p.name for p in ct + mr] == ["ct.nii.gz", "mr.nii.gz"]
    assert [p.name for p in brats] == [f"br_{i:04d}.nii.gz" for i in range(4)]
    affine = bundles.case_affine(orientation, (0.8, 0.9, 2.5))
    assert np.allclose(np.linalg.norm(affine[:3, :3], axis=0), [0.8, 0.9, 2.5])
    if orientation == "LPS":
        assert np.allclose(affine, np.diag([-0.8, -0.9, 2.5, 1]))
    for path in ct + mr + brats:
        img = nib.load(path)
        assert img.shape == (48, 44, 20) and np.allclose(img.affine, affine, atol=1e-5)
    hu = np.asarray(nib.load(ct[0]).dataobj)
    assert hu.dtype == np.int16 and hu.min() <= -950 and ((hu > -57) & (hu < 164)).mean() > 0.2
    assert np.asarray(nib.load(mr[0]).dataobj).dtype == np.float32
    heads = [np.asarray(nib.load(p).dataobj) for p in brats]
    assert all(h.dtype == np.float32 for h in heads)
    assert all(((h == 0) == (heads[0] == 0)).all() and 0.2 < (h > 0).mean() < 0.9 for h in heads)


# Each shape's oracle output (shape, affine, at least two labels) is checked where it is used, beside segq's
# own in tests/integration/test_bundles.py: one oracle run a shape in CI, not two.


@pytest.mark.slow
def test_oracle_returns_cases_in_the_given_order(tmp_path: Path) -> None:
    bundle = make_bundle("brats", tmp_path)
    cases = [make_case("brats", tmp_path / "in", name, seed=i) for i, name in enumerate(["zeta", "alpha"])]
    outs = run_bundle_oracle(bundle, cases, tmp_path / "out")
    assert [p.name for p in outs] == ["zeta_0000_seg.nii.gz", "alpha_0000_seg.nii.gz"]
    assert not np.array_equal(np.asarray(nib.load(outs[0]).dataobj), np.asarray(nib.load(outs[1]).dataobj))


@pytest.mark.slow
def test_oracle_reads_yaml_and_checkpoint_bundles(tmp_path: Path) -> None:
    """inference.yaml and a {"model": state_dict} checkpoint give the same labels as inference.json + state_dict."""
    case = make_case("spleen", tmp_path / "in", "ct")
    outs = [run_bundle_oracle(make_bundle("spleen", tmp_path / fmt, fmt=fmt, weights=weights), [case],
                              tmp_path / f"out_{fmt}")[0]
            for fmt, weights in (("json", "state_dict"), ("yaml", "checkpoint"))]
    assert np.array_equal(np.asarray(nib.load(outs[0]).dataobj), np.asarray(nib.load(outs[1]).dataobj))
