"""`segq submit` runs on a laptop with no GPU stack: the producer side never imports torch."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import ROOT

PRODUCER_MODULES = ["segq.cli", "segq.celery_app", "segq.db", "segq.records", "segq.volumes", "segq.storage",
                    "producer.cli", "producer.submit", "producer.scan", "producer.wait", "producer.results"]


def test_producer_modules_do_not_import_torch() -> None:
    code = ("import sys\n" + "".join(f"import {m}\n" for m in PRODUCER_MODULES) +
            "from segq.cli import cli\n"
            "for name in ('submit', 'status', 'results'): cli.get_command(None, name)\n"
            "heavy = sorted(m for m in ('torch', 'monai', 'onnxruntime') if m in sys.modules)\n"
            "print(','.join(heavy))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert result.stdout.strip() == "", f"producer side imported {result.stdout.strip()}"
