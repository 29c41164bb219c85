"""The one settings object: defaults for the embedded setup, environment, settings file, validation."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from segq.settings import Settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("SEGQ_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


def test_embedded_defaults_need_no_variable() -> None:
    s = Settings()
    assert s.broker_url == "redis://127.0.0.1:6379/0" and s.backend_url == s.broker_url
    assert s.db_url.startswith("sqlite:///") and s.db_url.endswith("segq.db")
    assert s.storage_root == (s.data_dir / "storage").resolve()
    assert (s.backend, s.precision) == ("torch", "fp32")


def test_environment_wins_over_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "segq.toml").write_text('broker_url = "redis://file:6379/1"\nmax_windows_per_subtask = 7\n')
    monkeypatch.setenv("SEGQ_BROKER_URL", "redis://env:6379/2")
    s = Settings()
    assert s.broker_url == "redis://env:6379/2" and s.max_windows_per_subtask == 7


def test_named_settings_file_must_exist(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SEGQ_CONFIG", str(tmp_path / "nope.toml"))
    with pytest.raises(FileNotFoundError, match="nope.toml"):
        Settings()


def test_visibility_timeout_must_exceed_time_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEGQ_TASK_TIME_LIMIT", "600")
    monkeypatch.setenv("SEGQ_VISIBILITY_TIMEOUT", "300")
    with pytest.raises(ValidationError, match="must be longer than SEGQ_TASK_TIME_LIMIT"):
        Settings()


def test_bad_backend_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEGQ_BACKEND", "tensorflow")
    with pytest.raises(ValidationError, match="backend"):
        Settings()
