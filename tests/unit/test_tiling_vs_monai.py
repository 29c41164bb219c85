"""The split-and-merge path equals MONAI's sliding_window_inference (the independent reference)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.inferers import sliding_window_inference

from segq.modelspec import ModelSpec
from segq.tiling import importance_map, pad_volume, plan_windows, scan_interval, weight_sum
from worker.engines.base import Engine
from worker.engines.inference import infer_slab, merge_partials, nifti_order
from worker.engines.model import TargetClassProbability, build_network
from worker.jobs import workspace_input


class ModuleEngine:
    """An engine over an in-memory module (the real engines load checkpoints from disk)."""

    backend = "torch"
    precision = "fp32"
    device = torch.device("cpu")

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return self.module(batch)


def tiny_unet(in_channels: int = 1) -> TargetClassProbability:
    torch.manual_seed(0)
    spec = ModelSpec("UNet", in_channels, 2, 16, 1, checkpoint=None, feature_size=4)  # type: ignore[arg-type]
    return TargetClassProbability(build_network(spec), 1, 2).eval()


def split_merge(volume: np.ndarray, roi: int, overlap: float, mode: str, max_windows: int, engine: Engine,
                batch: int, layout: str = "C") -> np.ndarray:
    """The slab path on ``volume``, laid out in C order or as a job's workspace holds it (NIfTI's order)."""
    plan = plan_windows(volume.shape[1:], (roi,) * 3, overlap, mode)
    if layout == "nifti":
        loaded = np.ascontiguousarray(volume.transpose(0, 3, 2, 1)).transpose(0, 3, 2, 1)  # as load_volume gives it
        padded = workspace_input(loaded, plan, "none").transpose(0, 3, 2, 1)  # what load_input gives
        assert nifti_order(padded)
    else:
        padded = pad_volume(volume, plan)
    weights = importance_map(plan)
    if layout == "nifti":  # as a job runs: each partial divided on the device, the merge only adds
        partials = [(s.lo, infer_slab(padded, s, plan.roi, weights, engine, batch, starts=plan.starts))
                    for s in plan.slabs(max_windows)]
        assert all(nifti_order(p) for _lo, p in partials)
        return merge_partials(plan.padded_shape, partials, plan.crop)
    # as an earlier segq's parts: plain weighted sums, each divided by its rows of the whole weight sum
    # (what jobs.merge does with them)
    total = weight_sum(plan, weights)
    partials = [(s.lo, infer_slab(padded, s, plan.roi, weights, engine, batch)) for s in plan.slabs(max_windows)]
    partials = [(lo, part / total[lo : lo + part.shape[0]]) for lo, part in partials]
    return merge_partials(plan.padded_shape, partials, plan.crop)


CASES = [
    # shape, roi, overlap, mode, max_windows_per_slab, sw_batch_size
    ((1, 40, 37, 23), 16, 0.5, "gaussian", 5, 4),
    ((1, 33, 20, 45), 16, 0.25, "constant", 3, 3),
    ((1, 10, 30, 17), 16, 0.5, "gaussian", 2, 2),  # first dim smaller than the ROI: padded
    ((1, 16, 16, 16), 16, 0.5, "gaussian", 1, 8),  # exactly one window
    ((2, 24, 8, 31), 16, 0.6, "gaussian", 4, 5),  # two channels, a dim half the ROI
    ((1, 50, 19, 21), 16, 0.0, "constant", 100, 8),  # no overlap, one slab
]


@pytest.mark.parametrize("layout", ["C", "nifti"])
@pytest.mark.parametrize(("shape", "roi", "overlap", "mode", "max_windows", "batch"), CASES)
def test_split_merge_equals_sliding_window_inference(shape, roi, overlap, mode, max_windows, batch, layout) -> None:
    module = tiny_unet(shape[0])
    volume = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    ours = split_merge(volume, roi, overlap, mode, max_windows, ModuleEngine(module), batch, layout)
    with torch.inference_mode():
        reference = sliding_window_inference(torch.from_numpy(volume)[None], (roi,) * 3, batch, module,
                                             overlap=overlap, mode=mode)[0, 0].numpy()
    assert ours.shape == shape[1:]
    np.testing.assert_allclose(ours, reference, atol=1e-4, rtol=0)


def test_slabs_cover_every_window_once_in_order_of_first_axis() -> None:
    plan = plan_windows((100, 40, 40), (16, 16, 16), 0.5, "gaussian")
    slabs = plan.slabs(7)
    flat = [s for slab in slabs for s in slab.starts]
    assert sorted(flat) == sorted(plan.starts)
    assert len(slabs) == -(-len(plan.starts) // 7)
    assert all(len(slab.starts) <= 7 for slab in slabs)
    assert [s[0] for s in flat] == sorted(s[0] for s in flat)
    for slab in slabs:
        assert slab.lo == min(s[0] for s in slab.starts) and slab.hi == max(s[0] for s in slab.starts) + 16


def test_plan_round_trips_through_json() -> None:
    plan = plan_windows((10, 70, 33), (16, 16, 16), 0.25, "constant")
    from segq.tiling import WindowPlan

    assert WindowPlan.from_json(plan.to_json()) == plan
    assert plan.pad[0] == (3, 3) and plan.padded_shape == (16, 70, 33)


def test_slabs_refuse_zero() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        plan_windows((20, 20, 20), (16, 16, 16), 0.5, "gaussian").slabs(0)


@pytest.mark.parametrize(("padded", "roi", "overlap"), [
    ((240, 240, 155), (96, 96, 96), 0.5), ((96, 100, 97), (96, 96, 96), 0.25), ((40, 37, 23), (16, 16, 16), 0.99),
    ((32, 32, 32), (32, 32, 32), 0.5), ((64, 48, 33), (32, 16, 8), 0.0),
])
def test_vendored_scan_interval_is_monais(padded: tuple[int, ...], roi: tuple[int, ...], overlap: float) -> None:
    from monai.inferers.utils import _get_scan_interval

    assert scan_interval(padded, roi, overlap) == _get_scan_interval(padded, roi, 3, (overlap,) * 3)


@pytest.mark.parametrize("layout", ["C", "nifti"])
def test_merge_partials_copies_and_adds_like_a_sum_of_every_partial(layout: str) -> None:
    """Overlapping bands, a part inside another's rows, rows no part covers, parts out of order."""
    rng = np.random.default_rng(4)
    shape = (30, 6, 5)
    spans = [(12, 20), (0, 8), (5, 14), (14, 16), (24, 28)]  # rows 20-23 and 28-29 uncovered
    parts = []
    for lo, hi in spans:
        part = rng.random((hi - lo, *shape[1:]), dtype=np.float32)
        parts.append((lo, np.asfortranarray(part) if layout == "nifti" else part))
    expected = np.zeros(shape, dtype=np.float32)
    for lo, part in parts:
        expected[lo : lo + part.shape[0]] += part
    crop = (slice(1, 29), slice(0, 6), slice(0, 4))
    merged = merge_partials(shape, parts, crop)
    np.testing.assert_allclose(merged, expected[crop], rtol=1e-6, atol=0)


def test_a_device_without_room_for_the_transposed_copies_gives_the_same_partial(monkeypatch) -> None:
    """The slab's rows and its partial are transposed on the device; out of memory there, the rows stay
    strided and the partial is transposed on the host, with the same values and memory order."""
    volume = np.random.default_rng(5).normal(size=(1, 40, 37, 23)).astype(np.float32)
    plan = plan_windows(volume.shape[1:], (16, 16, 16), 0.5, "gaussian")
    loaded = np.ascontiguousarray(volume.transpose(0, 3, 2, 1)).transpose(0, 3, 2, 1)
    padded = workspace_input(loaded, plan, "none").transpose(0, 3, 2, 1)
    engine, weights, slab = ModuleEngine(tiny_unet()), importance_map(plan), plan.slabs(5)[1]
    roomy = infer_slab(padded, slab, plan.roi, weights, engine, 4)
    contiguous, refused = torch.Tensor.contiguous, []

    def full_device(self: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.dim() in (3, 4) and not self.is_contiguous():  # a slab's rows or partial, not a network batch
            refused.append(tuple(self.shape))
            raise torch.OutOfMemoryError("simulated: no room for the transposed copy")
        return contiguous(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "contiguous", full_device)
    full = infer_slab(padded, slab, plan.roi, weights, engine, 4)
    assert len(refused) == 2 and nifti_order(full)
    np.testing.assert_array_equal(full, roomy)
