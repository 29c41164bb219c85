"""The operator commands (watch, resume, retry, cancel, report, metrics) run where no GPU stack is installed."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import ROOT

MODULES = ["producer.watch", "producer.wait", "producer.manage", "producer.report", "producer.results",
           "segq.metrics_http", "segq.names"]
COMMANDS = ["watch", "resume", "retry", "cancel", "report", "metrics"]


def test_operator_commands_do_not_import_torch() -> None:
    code = ("import sys\n" + "".join(f"import {m}\n" for m in MODULES) +
            "from segq.cli import cli\n"
            f"for name in {COMMANDS!r}: assert cli.get_command(None, name) is not None, name\n"
            "heavy = sorted(m for m in ('torch', 'monai', 'onnxruntime') if m in sys.modules)\n"
            "print(','.join(heavy))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"operator commands imported {result.stdout.strip()}"
