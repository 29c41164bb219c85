"""Shared test helpers: environment switching, real worker processes, small models and volumes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def reset_caches() -> None:
    """Forget cached settings, app and engines so a new environment takes effect in this process."""
    from segq import celery_app, db, settings

    settings.get_settings.cache_clear()
    celery_app.get_app.cache_clear()
    db.clear_caches()


@contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    reset_caches()
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        reset_caches()


class WorkerProcess:
    """A real ``segq worker`` subprocess (a Celery worker with prefork children)."""

    def __init__(self, env: dict[str, str], name: str, log: Path, extra: list[str] | None = None,
                 concurrency: int = 1, prefix: list[str] | None = None) -> None:
        self.env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        self.name = name
        self.log = log
        self.extra = extra or []
        self.concurrency = concurrency
        self.prefix = prefix or []  # e.g. `unshare -m sh -c ...` that execs the worker in a mount namespace
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 90) -> WorkerProcess:
        cmd = [*self.prefix, sys.executable, "-m", "segq.cli", "worker", "-n", f"{self.name}@%h",
               "-c", str(self.concurrency), "-l", "INFO", *self.extra]
        with open(self.log, "ab") as handle:
            self.proc = subprocess.Popen(cmd, env=self.env, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited with {self.proc.returncode}:\n{self.read_log()[-4000:]}")
            if " ready." in self.read_log():
                return self
            time.sleep(0.3)
        raise TimeoutError(f"worker {self.name} not ready after {timeout}s:\n{self.read_log()[-4000:]}")

    def read_log(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def children(self) -> list[int]:
        if self.proc is None:
            return []
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout
        return [int(pid) for pid in out.split()]

    def stop(self, timeout: float = 30) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def write_model(directory: Path, arch: str = "UNet", roi: int = 32, feature_size: int = 4, seed: int = 0,
                **fields: object) -> Path:
    """A randomly initialised model (checkpoint + model.toml) in ``directory``."""
    import torch

    from segq.modelspec import ModelSpec
    from segq.pipeline.toml import write_model_toml
    from worker.engines.model import build_network

    directory.mkdir(parents=True, exist_ok=True)
    spec = ModelSpec(arch, int(fields.pop("in_channels", 1)), 2, roi, 1, checkpoint=directory / "model.pt",  # type: ignore[call-overload]
                     feature_size=feature_size, **fields)
    torch.manual_seed(seed)
    network = build_network(spec)
    torch.save(network.state_dict(), spec.checkpoint)
    write_model_toml(directory / "model.toml", spec)
    return directory / "model.toml"


def write_volume(path: Path, shape: tuple[int, ...], seed: int = 0, spacing: tuple[float, float, float] = (1, 1, 2),
                 dtype: type = np.float32) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    data = rng.normal(size=shape).astype(dtype)
    affine = np.diag([*spacing, 1.0])
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def write_nan_volume(path: Path, shape: tuple[int, int, int] = (30, 30, 30),
                     at: tuple[int, int, int] = (0, 0, 0)) -> Path:
    """A volume that is fine but for one NaN voxel: the job must fail with the reason, alone."""
    data = np.ones(shape, np.float32)
    data[at] = np.nan
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    return path


def load_mask(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


_references: dict[tuple[str, str], np.ndarray] = {}


def reference_probability(volume_path: Path, model_toml: Path) -> np.ndarray:
    """MONAI's sliding_window_inference on the same preprocessed volume: the independent reference."""
    key = (str(volume_path), str(model_toml))
    if key not in _references:
        import torch
        from monai.inferers import sliding_window_inference

        from segq.pipeline.toml import load_model_spec
        from worker.engines.model import load_model
        from worker.jobs import preprocess

        spec = load_model_spec(model_toml)
        data = np.asarray(nib.load(str(volume_path)).get_fdata(dtype=np.float32))
        volume = preprocess(data[None] if data.ndim == 3 else np.moveaxis(data, -1, 0), spec.preprocess)
        with torch.inference_mode():
            prob = sliding_window_inference(torch.from_numpy(volume)[None], spec.roi, spec.sw_batch_size,
                                            load_model(spec), overlap=spec.overlap, mode=spec.mode)
        assert isinstance(prob, torch.Tensor)
        _references[key] = prob[0, 0].numpy()
    return _references[key]
