"""Which storage is the shared one: a marker file in SEGQ_STORAGE, its id registered in Redis by the first worker.

Every worker must see the workspaces the others write. A worker whose SEGQ_STORAGE is another directory (a mount
missing on its machine, a typo) cannot, and each part it took failed its job. Now a worker compares the marker of
its storage with the registered one when it starts (refusing to start, EX_CONFIG) and when it cannot find a
workspace (handing the message back and stopping), so it never fails a job that a healthy worker could run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from segq.names import STORAGE_KEY
from segq.storage import printable, temp_name

logger = logging.getLogger("segq.sharedstorage")

MARKER = ".segq-storage"


@dataclass(frozen=True)
class Registration:
    id: str
    path: str
    worker: str


def marker_id(root: Path, create: bool = False) -> str | None:
    """The id in ``root``'s marker file; with ``create``, a new one written (exclusively) when there is none."""
    marker = root / MARKER
    if create and not marker.exists():
        root.mkdir(parents=True, exist_ok=True)
        draft = temp_name(marker)
        try:
            draft.write_text(uuid.uuid4().hex)
            with contextlib.suppress(FileExistsError):  # another worker on the same storage published one first
                os.link(draft, marker)  # whole or absent: a reader never sees an empty marker
        finally:
            draft.unlink(missing_ok=True)
    try:
        return marker.read_text().strip() or None
    except OSError:
        return None


def registered(client: Any) -> Registration | None:
    raw = client.get(STORAGE_KEY)
    if not raw:
        return None
    data = json.loads(raw)
    return Registration(str(data["id"]), str(data["path"]), str(data["worker"]))


def register(client: Any, root: Path, worker: str) -> Registration:
    """The registered storage; this worker's ``root`` becomes it when none is registered yet."""
    found = registered(client)
    if found is not None:
        return found
    own = marker_id(root, create=True)
    if own is None:
        raise OSError(f"cannot write the storage marker {root / MARKER}")
    client.set(STORAGE_KEY, json.dumps({"id": own, "path": str(root), "worker": worker}), nx=True)
    return registered(client) or Registration(own, str(root), worker)


def problem(client: Any, root: Path, worker: str, *, start: bool = False) -> str | None:
    """Why ``root`` is not the shared storage (one line, saying what to do), or None when it is (or when nothing is
    registered and not ``start``: then nothing tells). At ``start``, a first worker registers its storage."""
    found = register(client, root, worker) if start else registered(client)
    if found is None:
        return None
    own = marker_id(root)
    if own == found.id:
        return None
    here = f"its marker is {own[:8]}" if own else f"it holds no {MARKER} marker"
    return (f"storage is not shared: SEGQ_STORAGE={printable(str(root))} on worker {printable(worker)} is not the "
            f"storage the other workers use ({here}; {printable(found.worker)} registered {printable(found.path)}, "
            f"marker {found.id[:8]}). Mount the same filesystem at the same path on every machine, then start this "
            "worker again")
