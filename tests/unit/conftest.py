"""Fixtures the unit tests share."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import environment


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Iterator[None]:
    """A real SQLite database of this test's own, migrated to the newest schema, as SEGQ_DATABASE_URL."""
    url = f"sqlite:///{tmp_path / 'segq.db'}"
    with environment({"SEGQ_DATABASE_URL": url, "SEGQ_DATA_DIR": str(tmp_path / "data")}):
        from segq.db import upgrade

        upgrade(url)
        yield
