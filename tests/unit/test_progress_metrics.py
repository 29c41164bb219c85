"""The Prometheus endpoint: text format, figures from a real SQLite database, and the HTTP server."""

from __future__ import annotations

import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from segq.metrics_http import exposition, family, serve
from tests.helpers import environment


def test_family_text_format_escapes_labels() -> None:
    text = family("segq_x", "gauge", "An example.", [({"worker": 'a"b\\c'}, 2.0), ({}, 0.5)])
    assert text == ('# HELP segq_x An example.\n# TYPE segq_x gauge\n'
                    'segq_x{worker="a\\"b\\\\c"} 2\nsegq_x 0.5\n')


@pytest.fixture
def database(tmp_path: Path) -> Iterator[str]:
    url = f"sqlite:///{tmp_path / 'segq.db'}"
    # Port 1 refuses at once: the broker part must fail alone, without failing the scrape.
    with environment({"SEGQ_DATABASE_URL": url, "SEGQ_BROKER_URL": "redis://127.0.0.1:1/0",
                      "SEGQ_DATA_DIR": str(tmp_path)}):
        from segq.db import upgrade

        upgrade(url)
        yield url


def _fill() -> None:
    from segq.db import session_scope
    from segq.models import Dataset, Job, Status, Subtask, utcnow

    with session_scope() as s:
        ds = Dataset(name="n", out_dir="/o", model_path="/m", model_sha256="0" * 64, params={})
        s.add(ds)
        s.flush()
        done = Job(dataset_id=ds.id, input_path="/a", input_sha256="1", fingerprint="1", output_path="/o/a",
                   status=Status.DONE, preprocess_seconds=1.5, inference_seconds=4.0, merge_seconds=0.5)
        queued = Job(dataset_id=ds.id, input_path="/b", input_sha256="2", fingerprint="2", output_path="/o/b")
        s.add_all([done, queued])
        s.flush()
        s.add_all([Subtask(job_id=done.id, slab=0, windows=4, status=Status.DONE, worker="w1@h", seconds=3.0,
                           finished_at=utcnow(), gpu_peak_bytes=3 << 30),
                   Subtask(job_id=done.id, slab=1, windows=2, status=Status.DONE, worker="w2@h", seconds=1.0,
                           finished_at=utcnow())])


def test_exposition_from_the_database(database: str) -> None:
    _fill()
    text = exposition()
    assert 'segq_jobs{status="done"} 1' in text and 'segq_jobs{status="queued"} 1' in text
    assert 'segq_jobs{status="cancelled"} 0' in text
    assert "segq_windows_processed_total 6" in text
    assert 'segq_phase_seconds_total{phase="inference"} 4' in text
    assert 'segq_worker_windows_total{worker="w1@h"} 4' in text
    assert 'segq_worker_busy_seconds_total{worker="w2@h"} 1' in text
    assert f'segq_worker_gpu_peak_bytes{{worker="w1@h"}} {3 << 30}' in text and 'gpu_peak_bytes{worker="w2' not in text
    assert 'segq_up{source="database"} 1' in text and 'segq_up{source="broker"} 0' in text
    # the backlog: the queued job waits for room; the done job's parts are not waiting
    assert "segq_volumes_queued 1" in text and "segq_volumes_admitted 0" in text
    assert "segq_gpu_windows_queued 0" in text and 'segq_up{source="backlog"} 1' in text


def test_http_server_answers_metrics_and_404(database: str) -> None:
    server = serve("127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
            assert answer.status == 200 and answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            assert "# TYPE segq_jobs gauge" in answer.read().decode()
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/nope", timeout=10)
        assert missing.value.code == 404
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
