"""One typed settings object; the only reader of ``os.environ`` in segq.

Values come from, highest first: the environment (prefix ``SEGQ_``), a TOML settings file
(``SEGQ_CONFIG``, else ``./segq.toml`` when present), then defaults that make the embedded
setup (local Redis, SQLite, local storage) work with nothing set.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

Backend = Literal["torch", "onnxruntime", "tensorrt"]
Precision = Literal["fp32", "fp16", "bf16"]


def _default_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "segq"


class Settings(BaseSettings):
    """Everything a producer or worker needs to know about its deployment."""

    model_config = SettingsConfigDict(env_prefix="SEGQ_", extra="ignore")

    broker_url: str = "redis://127.0.0.1:6379/0"
    result_backend: str | None = None
    database_url: str | None = None
    data_dir: Path = Field(default_factory=_default_data_dir)
    storage: Path | None = None
    max_windows_per_subtask: int = Field(default=32, ge=1)
    backend: Backend = "torch"
    precision: Precision = "fp32"
    device: str = "auto"
    torch_compile: bool = False
    # Celery reliability: the visibility timeout must exceed the hard time limit, or Redis
    # redelivers a task that is still running.
    task_time_limit: int = Field(default=3600, ge=10)
    visibility_timeout: int = Field(default=7200, ge=20)
    result_expires: int = Field(default=7 * 24 * 3600, ge=3600)
    max_retries: int = Field(default=3, ge=0)
    max_deliveries: int = Field(default=3, ge=1)
    max_voxels: int = Field(default=1024**3, ge=1)
    job_deadline: int = Field(default=6 * 3600, ge=60)
    log_level: str = "INFO"

    @field_validator("visibility_timeout")
    @classmethod
    def _visibility_above_limit(cls, value: int, info: Any) -> int:
        limit = info.data.get("task_time_limit", 0)
        if value <= limit:
            raise ValueError(
                f"SEGQ_VISIBILITY_TIMEOUT ({value}s) must be longer than SEGQ_TASK_TIME_LIMIT ({limit}s), "
                "or Redis hands a running task to a second worker"
            )
        return value

    @property
    def backend_url(self) -> str:
        return self.result_backend or self.broker_url

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'segq.db'}"

    @property
    def storage_root(self) -> Path:
        return (self.storage or self.data_dir / "storage").expanduser().resolve()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config = os.environ.get("SEGQ_CONFIG")
        path = Path(config) if config else Path("segq.toml")
        if config and not path.is_file():
            raise FileNotFoundError(f"SEGQ_CONFIG names {path}, which is not a file")
        if path.is_file():
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()


def child_environment(**overrides: str) -> dict[str, str]:
    """A copy of this process's environment with overrides, for the worker launcher's children."""
    env = dict(os.environ)
    env.update(overrides)
    return env
