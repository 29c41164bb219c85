"""Issue 24, item 6: PostgreSQL unreachable for 20 s under real workers (scenario 31).

The shared server is never stopped: the test makes a database of its own and shuts only that one, the way an
outage looks to a client (``ALLOW_CONNECTIONS false``, then every backend on it terminated: running statements
fail, new connections are refused), then opens it again.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import POSTGRES_URL
from tests.helpers import write_volume
from tests.reliability import assert_nothing_lost, deployment, figure, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SHAPE = (64, 40, 36)  # at ROI 32, overlap 0.5: 12 windows, 3 parts of 4
OUTAGE_SECONDS = 20.0


@contextmanager
def own_database() -> Iterator[tuple[str, Any]]:
    """A fresh PostgreSQL database (URL, admin engine on the shared server), dropped afterwards."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    name = f"segq_outage_{uuid.uuid4().hex[:8]}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # OperationalError when the server is absent
        pytest.skip(f"needs PostgreSQL at {POSTGRES_URL} (set SEGQ_TEST_POSTGRES_URL): {exc}")
    try:
        yield make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False), admin
    finally:
        from segq import db

        db.clear_caches()
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def shut(admin: Any, url: str, allow: bool) -> int:
    """Refuse (or allow again) connections to the database of ``url``; when refusing, end every session on it."""
    from sqlalchemy import text
    from sqlalchemy.engine import make_url

    name = make_url(url).database
    with admin.connect() as conn:
        conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {"true" if allow else "false"}'))
        if allow:
            return 0
        ended = conn.execute(text("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                  "WHERE datname = :name AND pid <> pg_backend_pid()"), {"name": name})
        return int(ended.scalar() or 0)


def test_database_outage_loses_nothing_and_logs_one_line(tmp_path: Path, unet_model: Path) -> None:
    """Scenario 31. Before the fix: admitted volumes whose prepare met the outage failed once on OperationalError
    and stayed ``queued`` for good, the chord's error callback raised too, each worker logged about 111 tracebacks,
    and `segq status` printed 8 KB of SQLAlchemy."""
    with own_database() as (url, admin), deployment(tmp_path, SEGQ_DATABASE_URL=url, SEGQ_ADMIT_INTERVAL="1") as dep:
        workers = [dep.worker("w1"), dep.worker("w2")]
        scans = [write_volume(tmp_path / "scans" / f"v{k}.nii.gz", SHAPE, seed=k) for k in range(8)]
        dep.submit(scans, tmp_path / "out", unet_model)
        wait_for(lambda: any(r.status == "done" for r in dep.jobs()), 180, "a first volume done")
        before = {r.id: r.status for r in dep.jobs()}
        marks = [len(w.read_log()) for w in workers]
        from segq import db

        db.get_engine().dispose()  # this test's own connections go with the others
        cut = shut(admin, url, allow=False)
        down = time.monotonic()
        status = dep.segq("status", timeout=60)
        time.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - down)))
        shut(admin, url, allow=True)
        outage = time.monotonic() - down
        rows = dep.wait(300)
        recovered = time.monotonic() - down - outage
        assert_nothing_lost(dep, unet_model, done={p.name for p in scans})

    assert status.returncode == 1, status.stdout + status.stderr
    lines = [line for line in (status.stdout + status.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot reach the database" in lines[0], lines
    assert "s3cret" not in lines[0] and "Traceback" not in lines[0]
    logs = [w.read_log()[mark:] for w, mark in zip(workers, marks, strict=True)]
    for log in logs:
        assert "Traceback" not in log, log[-4000:]
    noted = [log.count("cannot be reached") for log in logs]
    mentions = [sum(1 for line in log.splitlines() if "database" in line.lower() or "OperationalError" in line)
                for log in logs]
    # one line a process (the worker and its pool process) an outage, and one a retry of a step that met it
    assert all(1 <= n <= 2 for n in noted), noted
    assert all(n <= 40 for n in mentions), mentions
    waiting = sum(1 for status_ in before.values() if status_ != "done")
    figure("29 database outage", f"PostgreSQL database refused for {outage:.0f} s ({cut} sessions ended) with "
           f"{waiting} of 8 volumes unfinished; all 8 done {recovered:.0f} s after it came back, attempts "
           f"{sorted({r.attempt for r in rows})}; log lines about it per worker {mentions} (outage notices {noted}), "
           "0 tracebacks; `segq status` one line")
