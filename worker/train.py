"""Train the demo model on synthetic volumes from ``segq.demo`` (CPU, a few minutes).

The data is generated in memory and refreshed while training, so the network never sees the
evaluation volumes (other seeds) and overfits no fixed set. Inputs get exactly the pipeline's
preprocessing (``segq.preprocess.zscore_nonzero``), and the saved checkpoint is the bare network's
``state_dict``, which ``worker.engines.model.load_model`` loads with ``weights_only=True``.

    python -m worker.train -o models/demo --steps 900
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch
from torch import nn

from segq.demo import DEFAULT_SHAPE, make_volume
from segq.metrics import dice
from segq.modelspec import ARCHS, ModelSpec
from segq.pipeline.toml import write_model_toml
from segq.preprocess import zscore_nonzero
from worker.engines.model import TargetClassProbability, build_network

logger = logging.getLogger("segq.train")

CHECKPOINT_NAME = "demo.pt"
MODEL_FILE_NAME = "model.toml"
THREADS = 2
POOL_SIZE = 16
REFRESH_EVERY = 4  # steps between replacing one pooled volume with a freshly generated one
FOREGROUND_FRACTION = 0.67  # share of crops centred near a lesion voxel
VALIDATION_VOLUMES = 2


@dataclass(frozen=True)
class Recipe:
    """Per-architecture training settings, chosen to fit a few minutes on a 2-core CPU."""

    feature_size: int
    roi_size: int
    batch_size: int
    learning_rate: float


RECIPES = {
    "UNet": Recipe(feature_size=16, roi_size=64, batch_size=2, learning_rate=3e-3),
    "SegResNet": Recipe(feature_size=8, roi_size=64, batch_size=2, learning_rate=2e-3),
    "SwinUNETR": Recipe(feature_size=12, roi_size=64, batch_size=1, learning_rate=1e-3),
}


def demo_spec(arch: str, checkpoint: Path) -> ModelSpec:
    """The spec the demo model is trained for and shipped with."""
    if arch not in RECIPES:
        raise ValueError(f"arch must be one of {', '.join(RECIPES)}, got {arch!r}")
    recipe = RECIPES[arch]
    spec = ModelSpec(arch=arch, in_channels=1, out_channels=2, roi_size=recipe.roi_size, target_class=1,
                     checkpoint=checkpoint, feature_size=recipe.feature_size, preprocess="zscore", overlap=0.5,
                     sw_batch_size=4, mode="gaussian")
    spec.validate()
    return spec


class VolumePool:
    """A rotating set of preprocessed synthetic volumes with their masks."""

    def __init__(self, rng: np.random.Generator, size: int, shape: tuple[int, int, int] = DEFAULT_SHAPE) -> None:
        self.rng = rng
        self.shape = shape
        self.items = [self._fresh() for _ in range(size)]

    def _fresh(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        image, mask, _ = make_volume(self.rng, self.shape)
        return zscore_nonzero(image), mask, np.argwhere(mask)

    def refresh_one(self) -> None:
        self.items[int(self.rng.integers(len(self.items)))] = self._fresh()

    def crop(self, roi: int) -> tuple[np.ndarray, np.ndarray]:
        """One random ``roi``-cube crop, centred near a lesion voxel with probability FOREGROUND_FRACTION."""
        image, mask, foreground = self.items[int(self.rng.integers(len(self.items)))]
        if len(foreground) and self.rng.random() < FOREGROUND_FRACTION:
            centre = foreground[int(self.rng.integers(len(foreground)))] + self.rng.integers(-roi // 4, roi // 4 + 1, 3)
        else:
            centre = np.array([self.rng.integers(n) for n in image.shape])
        starts = [int(np.clip(c - roi // 2, 0, max(n - roi, 0))) for c, n in zip(centre, image.shape, strict=True)]
        window = tuple(slice(s, s + roi) for s in starts)
        image_crop, mask_crop = image[window], mask[window]
        for axis in range(3):
            if self.rng.random() < 0.5:
                image_crop, mask_crop = np.flip(image_crop, axis), np.flip(mask_crop, axis)
        return _pad_to(image_crop, roi), _pad_to(mask_crop, roi)

    def batch(self, roi: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        crops = [self.crop(roi) for _ in range(size)]
        images = torch.from_numpy(np.stack([c[0] for c in crops])[:, None].copy())
        masks = torch.from_numpy(np.stack([c[1] for c in crops])[:, None].astype(np.int64))
        return images, masks


def _pad_to(array: np.ndarray, roi: int) -> np.ndarray:
    """Pad a crop of a volume smaller than ``roi`` with its minimum (the background) up to the full cube."""
    pad = [(0, max(roi - n, 0)) for n in array.shape]
    return np.pad(array, pad, constant_values=array.min()) if any(p[1] for p in pad) else array


def train_demo(out_dir: Path, *, arch: str, steps: int, seed: int, progress: bool = True) -> Path:
    """Train the demo network, write ``out_dir/demo.pt`` and ``out_dir/model.toml``; return the toml path."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = demo_spec(arch, out_dir / CHECKPOINT_NAME)
    torch.set_num_threads(THREADS)
    torch.manual_seed(seed)
    data_seed, validation_seed = np.random.SeedSequence(seed).spawn(2)
    network = build_network(spec)
    started = time.monotonic()
    _fit(network, VolumePool(np.random.default_rng(data_seed), POOL_SIZE), spec, steps, progress)
    logger.info("trained %s for %d steps in %.0f s", arch, steps, time.monotonic() - started)
    score = validate(network.eval(), spec, np.random.default_rng(validation_seed), VALIDATION_VOLUMES)
    logger.info("mean Dice on %d fresh volumes: %.3f", VALIDATION_VOLUMES, score)
    torch.save(network.state_dict(), spec.checkpoint)
    toml_path = out_dir / MODEL_FILE_NAME
    write_model_toml(toml_path, spec)
    logger.info("wrote %s and %s", spec.checkpoint, toml_path)
    return toml_path


def _fit(network: nn.Module, pool: VolumePool, spec: ModelSpec, steps: int, progress: bool) -> None:
    from monai.losses import DiceCELoss
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    recipe = RECIPES[spec.arch]
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.Adam(network.parameters(), lr=recipe.learning_rate)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe.learning_rate, total_steps=steps,
                                                   pct_start=0.05)
    network.train()
    columns = (TextColumn("training {task.fields[arch]}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]:.3f}"), TimeRemainingColumn())
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("train", total=steps, arch=spec.arch, loss=float("nan"))
        for step in range(1, steps + 1):
            images, masks = pool.batch(spec.roi_size, recipe.batch_size)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(network(images), masks)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.update(task, advance=1, loss=loss.item())
            if step % REFRESH_EVERY == 0:
                pool.refresh_one()
            if not progress and step % 50 == 0:
                logger.info("step %d/%d loss %.3f", step, steps, loss.item())


@torch.no_grad()
def validate(network: nn.Module, spec: ModelSpec, rng: np.random.Generator, count: int) -> float:
    """Mean Dice on fresh volumes of inference as the pipeline runs it: sliding window, probability >= 0.5."""
    from monai.inferers import sliding_window_inference

    model = TargetClassProbability(network, spec.target_class, spec.out_channels).eval()
    scores = []
    for _ in range(count):
        image, mask, _ = make_volume(rng, DEFAULT_SHAPE)
        x = torch.from_numpy(zscore_nonzero(image))[None, None]
        prob = cast(torch.Tensor, sliding_window_inference(x, spec.roi, spec.sw_batch_size, model,
                                                           overlap=spec.overlap, mode=spec.mode))
        scores.append(dice(prob[0, 0].numpy() >= 0.5, mask))
    return float(np.mean(scores))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the segq demo model on synthetic volumes (CPU).")
    parser.add_argument("-o", "--out-dir", type=Path, required=True,
                        help="folder for demo.pt and model.toml (models/demo, the shipped one, only if named)")
    parser.add_argument("--arch", choices=ARCHS, default="UNet", help="network (default: UNet)")
    parser.add_argument("--steps", type=int, default=900, help="optimiser steps (default: 900)")
    parser.add_argument("--seed", type=int, default=1, help="training seed; evaluate with other seeds (default: 1)")
    parser.add_argument("--no-progress", action="store_true", help="log every 50 steps instead of a progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    train_demo(args.out_dir, arch=args.arch, steps=args.steps, seed=args.seed, progress=not args.no_progress)


if __name__ == "__main__":
    main()
