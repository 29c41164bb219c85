"""The network named by a model.toml, and the wrapper that returns only the target-class probability."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from segq.errors import InputError
from segq.modelspec import ModelSpec
from segq.pipeline.bundle_stages import network_def
from worker.engines.startup import StartClock, timed

logger = logging.getLogger("segq.model")


def build_network(spec: ModelSpec) -> nn.Module:
    """The bare MONAI network, randomly initialised."""
    from monai.networks import nets

    if spec.arch == "SwinUNETR":
        return nets.SwinUNETR(in_channels=spec.in_channels, out_channels=spec.out_channels,
                              feature_size=spec.feature_size, spatial_dims=3)
    if spec.arch == "UNet":
        f = spec.feature_size
        return nets.UNet(spatial_dims=3, in_channels=spec.in_channels, out_channels=spec.out_channels,
                         channels=(f, 2 * f, 4 * f, 8 * f), strides=(2, 2, 2), num_res_units=1)
    if spec.arch == "SegResNet":
        return nets.SegResNet(spatial_dims=3, in_channels=spec.in_channels, out_channels=spec.out_channels,
                              init_filters=spec.feature_size)
    raise InputError(f"unknown arch {spec.arch!r}")


def _gist(exc: Exception) -> str:
    """The line of torch's multi-paragraph load error that says what was refused (one line, bounded)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    telling = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), lines[0])
    return telling[:200]


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a plain state_dict. ``weights_only=True`` refuses pickled code, so a checkpoint cannot run anything."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError or EOFError for unsafe or broken files
        raise InputError(
            f"checkpoint {path} is not a plain PyTorch state_dict loadable with weights_only=True "
            f"({_gist(exc)}); save it with torch.save(model.state_dict(), path)"
        ) from exc
    for key in ("state_dict", "model"):  # a training checkpoint, or the {"model": ...} MONAI's CheckpointLoader takes
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"checkpoint {path} holds a {type(state).__name__}, not a state_dict of tensors")
    return state


class TargetClassProbability(nn.Module):
    """Returns only the target channel's probability, computed where the model runs.

    Half the bytes of a two-class output leave the device, and no CPU softmax or argmax is needed.
    The softmax is taken in float32 even for an fp16 network: fp16 exponentials lose the small
    differences between logits that decide voxels near the 0.5 boundary.
    """

    def __init__(self, network: nn.Module, target_class: int, out_channels: int) -> None:
        super().__init__()
        self.network = network
        self.target_class = target_class
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.network(x).float()
        if self.out_channels == 1:
            return torch.sigmoid(logits)
        t = self.target_class
        return torch.softmax(logits, dim=1)[:, t : t + 1]


class AllChannels(nn.Module):
    """Every output channel, as the network gives it (logits), in float32: a bundle's postprocessing applies
    its own activation after the windows are summed, as ``sliding_window_inference`` then its evaluator do."""

    def __init__(self, network: nn.Module, out_channels: int) -> None:
        super().__init__()
        self.network = network
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.network(x)
        if isinstance(out, list | tuple):  # deep supervision heads: the first is the prediction
            out = out[0]
        return out.float()


def _mismatch(network: nn.Module, state: dict[str, torch.Tensor]) -> str | None:
    """One line naming how the checkpoint differs from the network, or None when it fits.

    PyTorch's own message lists every key (thousands of characters for a SwinUNETR); a user needs the
    counts and the first example of each kind.
    """
    expected = network.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k}: checkpoint {list(state[k].shape)}, network {list(v.shape)}"
              for k, v in expected.items() if k in state and state[k].shape != v.shape]
    found = [(len(missing), "missing", missing), (len(unexpected), "unexpected", unexpected),
             (len(shapes), "of another shape", shapes)]
    parts = [f"{n} weight(s) {what} (e.g. {items[0]})" for n, what, items in found if n]
    return "; ".join(parts) or None


def checked_load(network: nn.Module, state: dict[str, torch.Tensor], weights: Path, where: str) -> nn.Module:
    """``network`` with ``state`` loaded strictly; InputError in one line when they do not fit."""
    problem = _mismatch(network, state)
    if problem:
        raise InputError(f"checkpoint {weights} does not fit the network of {where}: {problem}; "
                         "use the matching checkpoint")
    network.load_state_dict(state, strict=True)
    return network


def build_bundle_network(spec: ModelSpec) -> nn.Module:
    """A bundle's network with its weights, on the CPU in eval mode.

    ``models/model.pt`` is a state dict or the ``{"model": state_dict}`` that MONAI's CheckpointLoader
    takes, loaded with ``weights_only=True``; ``models/model.ts`` is TorchScript, the network itself.
    """
    weights = Path(spec.checkpoint)
    if weights.suffix == ".ts":
        try:
            return torch.jit.load(str(weights), map_location="cpu").eval()
        except RuntimeError as exc:
            raise InputError(f"bundle weights {weights} are not a TorchScript archive ({str(exc)[:200]})") from exc
    network = network_def(spec)
    state = load_state_dict(weights)
    return checked_load(network, state, weights, f"bundle {spec.bundle}").eval()


def build_checked(spec: ModelSpec, clock: StartClock | None = None) -> nn.Module:
    """The bare network with the spec's checkpoint loaded; InputError in one line when either does not fit.

    Submit calls this once on the CPU, so a checkpoint that does not fit its model file is refused before
    anything is queued, not by every volume on the workers.
    """
    if spec.is_bundle:
        with timed(clock, "network build"):  # a bundle's network comes with its checkpoint loaded
            return build_bundle_network(spec)
    where = f"model file {spec.path}" if spec.path else f"{spec.arch} spec"
    try:
        with timed(clock, "network build"):
            network = build_network(spec)
    except (ValueError, TypeError, AssertionError, RuntimeError) as exc:  # MONAI's checks, e.g. GroupNorm groups
        reason = " ".join(str(exc).split())[:300]
        raise InputError(f"{where}: {spec.arch} cannot be built with these settings ({reason}); "
                         "fix the model file") from None
    with timed(clock, "checkpoint load"):
        state = load_state_dict(spec.checkpoint)
        problem = _mismatch(network, state)
        if problem:
            raise InputError(f"checkpoint {spec.checkpoint} does not fit {spec.arch} as configured in {where}: "
                             f"{problem}; fix the model file or use the matching checkpoint")
        network.load_state_dict(state, strict=True)
    return network


def load_model(spec: ModelSpec, clock: StartClock | None = None) -> TargetClassProbability:
    """The wrapped network with the spec's checkpoint loaded, in eval mode, on the CPU: the target class's
    probability for a model.toml, every channel's logits for a bundle."""
    network = build_checked(spec, clock)
    if spec.is_bundle:
        return AllChannels(network, spec.out_channels).eval()  # type: ignore[return-value]
    return TargetClassProbability(network, spec.target_class, spec.out_channels).eval()
