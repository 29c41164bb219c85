"""Accuracy gate: an engine's mask on a reference volume must agree with the fp32 PyTorch mask.

A reduced-precision engine is only kept if it segments like the model it came from. The check runs
the real slab loop over a whole volume (the same windows, weights and merge a job uses) with both
engines and compares the thresholded masks by Dice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from segq.errors import EngineRefusedError
from segq.modelspec import ModelSpec
from segq.tiling import Slab, importance_map, pad_volume, plan_windows, weight_sum
from worker.engines.base import Engine

logger = logging.getLogger("segq.engine.gate")


@dataclass(frozen=True)
class GateResult:
    dice: float
    agreement: float
    voxels: int
    reference_positive: int
    candidate_positive: int

    def as_dict(self) -> dict[str, float | int]:
        return {"dice": round(self.dice, 6), "agreement": round(self.agreement, 6), "voxels": self.voxels,
                "reference_positive": self.reference_positive, "candidate_positive": self.candidate_positive}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty (they agree)."""
    a, b = a.astype(bool), b.astype(bool)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def compare_masks(reference: np.ndarray, candidate: np.ndarray) -> GateResult:
    if reference.shape != candidate.shape:
        raise ValueError(f"mask shapes differ: {reference.shape} vs {candidate.shape}")
    return GateResult(dice(reference, candidate), float(np.mean(reference == candidate)), int(reference.size),
                      int(reference.sum()), int(candidate.sum()))


def reference_volume(spec: ModelSpec, scale: float = 1.5, seed: int = 0) -> np.ndarray:
    """A deterministic synthetic volume (C, X, Y, Z) of ``scale`` ROIs a side: smooth blobs over noise,
    so the mask has structure rather than coin flips. Pass a real scan for a trained model."""
    side = int(round(max(spec.roi) * scale))
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*(np.linspace(-1, 1, side, dtype=np.float32),) * 3, indexing="ij"))
    volume = rng.normal(scale=0.3, size=(side,) * 3).astype(np.float32)
    for _ in range(6):
        centre = rng.uniform(-0.7, 0.7, size=(3, 1, 1, 1)).astype(np.float32)
        radius = rng.uniform(0.15, 0.4)
        volume += 2.0 * np.exp(-np.sum((grid - centre) ** 2, axis=0) / (2 * radius**2))
    return np.repeat(volume[None], spec.in_channels, axis=0)


def volume_probability(engine: Engine, volume: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """Target probability over a whole (C, X, Y, Z) volume through the slab loop, as one slab."""
    from worker.engines.inference import read_slab, slab_partial

    plan = plan_windows(volume.shape[1:], spec.roi, spec.overlap, spec.mode)
    padded = pad_volume(volume, plan)
    weights = importance_map(plan)
    slab = Slab(0, list(plan.starts), 0, plan.padded_shape[0])
    rows = read_slab(padded, slab, engine.device)
    total = slab_partial(rows, slab, padded.shape[2:], plan.roi, weights, engine, spec.sw_batch_size)
    total = total / torch.from_numpy(weight_sum(plan, weights)).to(total.device)
    crop = plan.crop if total.ndim == 3 else (slice(None), *plan.crop)
    return total.cpu().numpy()[crop]


def decision(probability: np.ndarray) -> np.ndarray:
    """What a job would make of an engine's output: the target probability at 0.5, or for every channel of a
    bundle's network, the foreground of the channels' argmax (its logits' ranking, before its postprocessing)."""
    if probability.ndim == 4:
        return np.argmax(probability, axis=0) > 0
    return probability >= 0.5


def reference_mask(reference: Engine, volume: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """The mask the gate holds an engine to: ``reference``'s (fp32 eager PyTorch) decision on ``volume``."""
    return decision(volume_probability(reference, volume, spec))


def check_mask(candidate: Engine, ref_mask: np.ndarray, spec: ModelSpec, volume: np.ndarray,
               min_dice: float = 0.99) -> GateResult:
    """Dice of ``candidate``'s mask against ``ref_mask``; EngineRefusedError with the figure below ``min_dice``."""
    result = compare_masks(ref_mask, decision(volume_probability(candidate, volume, spec)))
    logger.info("accuracy gate: Dice %.5f, voxel agreement %.5f (%s %s vs torch fp32)", result.dice, result.agreement,
                candidate.backend, candidate.precision)
    if result.dice < min_dice:
        raise EngineRefusedError(
            f"accuracy gate refused the {candidate.backend} {candidate.precision} engine: Dice {result.dice:.4f} "
            f"against the fp32 PyTorch mask (need >= {min_dice}); voxel agreement {result.agreement:.4%}. "
            f"{EngineRefusedError.HINT}")
    return result


def check_accuracy(candidate: Engine, reference: Engine, spec: ModelSpec, volume: np.ndarray,
                   min_dice: float = 0.99) -> GateResult:
    """Dice of ``candidate``'s mask against ``reference``'s; EngineRefusedError with the figure below ``min_dice``."""
    return check_mask(candidate, reference_mask(reference, volume, spec), spec, volume, min_dice)
