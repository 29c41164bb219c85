"""What every inference engine offers the slab loop."""

from __future__ import annotations

from typing import Protocol

import torch


class Engine(Protocol):
    """Maps a batch of ROIs (B, C, *roi, float32, on ``device``) to the target-class probability
    (B, 1, *roi, float32, on ``device``). Results stay on the device so accumulation does too."""

    backend: str
    precision: str
    device: torch.device

    def __call__(self, batch: torch.Tensor) -> torch.Tensor: ...
