"""Per-process state of a worker: its engine, loaded once and kept for every task it runs."""

from __future__ import annotations

import logging
import threading
from typing import Any

from segq.errors import InputError
from segq.modelspec import ModelSpec, spec_from_dict
from segq.settings import Settings
from worker.engines import Engine, create_engine, pick_device

logger = logging.getLogger("segq.runtime")

_engines: dict[tuple[str, str, str], Engine] = {}
_lock = threading.Lock()


def engine_for(model: dict[str, Any], model_sha256: str, settings: Settings) -> tuple[ModelSpec, Engine]:
    """This process's engine for the job's model, built on first use.

    The checkpoint's checksum must still be the one recorded at submission: a model file changed
    under a queued dataset would otherwise give a dataset made by two different models.
    """
    spec = spec_from_dict(model)
    key = (model_sha256, settings.backend, settings.precision)
    with _lock:
        engine = _engines.get(key)
        if engine is None:
            actual = spec.checksum()
            if actual != model_sha256:
                raise InputError(f"the model at {spec.path} changed since the dataset was submitted "
                                 f"(checksum {actual[:12]}, recorded {model_sha256[:12]}); submit again")
            device = pick_device(settings.device)
            logger.info("loading %s engine (%s, %s) for model %s", settings.backend, settings.precision, device,
                        model_sha256[:12])
            engine = create_engine(spec, settings.backend, settings.precision, device, settings.torch_compile)
            _engines[key] = engine
    return spec, engine


def clear() -> None:
    with _lock:
        _engines.clear()
