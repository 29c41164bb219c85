"""A job's partials: divided on the device by their rows' weights, and still merged right when a worker of an
earlier segq left plain weighted sums (``slab_`` files, references without ``divided``)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from segq import storage
from segq.tiling import importance_map, plan_windows, weight_sum
from tests.unit.test_tiling_vs_monai import ModuleEngine, tiny_unet
from worker import jobs
from worker.engines.inference import infer_slab, row_weights


def test_row_weights_are_the_rows_of_the_whole_weight_sum() -> None:
    plan = plan_windows((40, 21, 19), (16, 16, 16), 0.5, "gaussian")
    weights, full = importance_map(plan), weight_sum(plan)
    for slab in plan.split(3):
        rows = row_weights(plan.starts, slab, plan.padded_shape[1:], plan.roi, weights, torch.device("cpu"))
        np.testing.assert_allclose(rows.numpy(), full[slab.lo : slab.hi], rtol=1e-6)


@pytest.mark.parametrize("old", [(), (0,), (0, 1, 2)], ids=["all new", "one old", "all old"])
def test_merge_takes_divided_and_plain_partials_alike(tmp_path: Path, old: tuple[int, ...]) -> None:
    rng = np.random.default_rng(6)
    volume = rng.normal(size=(1, 40, 21, 19)).astype(np.float32)
    source = tmp_path / "in.nii.gz"
    nib.save(nib.Nifti1Image(volume[0], np.eye(4)), source)
    plan = plan_windows(volume.shape[1:], (16, 16, 16), 0.5, "gaussian")
    slabs = plan.split(3)
    ws = tmp_path / "ws"
    storage.save_array(ws / jobs.INPUT, jobs.workspace_input(volume, plan, "none"))
    (ws / jobs.PLAN).write_text(json.dumps({"plan": plan.to_json(), "slabs": [s.to_json() for s in slabs]}))
    engine, weights, padded = ModuleEngine(tiny_unet()), importance_map(plan), jobs.load_input(ws)
    refs = []
    for slab in slabs:
        divided = slab.index not in old
        array = infer_slab(padded, slab, plan.roi, weights, engine, 4, starts=plan.starts if divided else None)
        storage.save_array(ws / jobs.slab_file(slab.index, divided), array)
        ref = jobs.slab_reference(slab, array.shape, storage.array_checksum(array), "w", divided)
        if not divided:
            del ref["divided"]  # as an earlier segq's reference reads
        refs.append(ref)
    out = tmp_path / "in_seg.nii.gz"
    jobs.merge(ws, refs, source, out, save_probabilities=True)
    merged = np.asarray(nib.load(storage.probability_path(out)).dataobj)
    total = np.zeros(plan.padded_shape, np.float32)
    for slab in slabs:
        total[slab.lo : slab.hi] += infer_slab(padded, slab, plan.roi, weights, engine, 4)
    expected = (total / weight_sum(plan))[plan.crop]
    np.testing.assert_allclose(merged, expected, rtol=1e-5, atol=1e-7)
    assert jobs.existing_reference(ws, 0, "w")["divided"] is (0 not in old)


def test_a_device_without_room_for_the_divisor_divides_on_the_host(monkeypatch) -> None:
    from worker.engines import inference

    volume = np.random.default_rng(7).normal(size=(1, 40, 21, 19)).astype(np.float32)
    plan = plan_windows(volume.shape[1:], (16, 16, 16), 0.5, "gaussian")
    engine, weights, slab = ModuleEngine(tiny_unet()), importance_map(plan), plan.split(3)[1]
    roomy = infer_slab(volume, slab, plan.roi, weights, engine, 4, starts=plan.starts)
    real, calls = inference.row_weights, []

    def full_once(*args, **kwargs):
        calls.append(args[-1])
        if len(calls) == 1:
            raise torch.OutOfMemoryError("simulated: no room for the divisor")
        return real(*args, **kwargs)

    monkeypatch.setattr(inference, "row_weights", full_once)
    np.testing.assert_array_equal(infer_slab(volume, slab, plan.roi, weights, engine, 4, starts=plan.starts), roomy)
    assert len(calls) == 2
