#!/usr/bin/env bash
# The whole test suite: installs what it needs, starts Redis and PostgreSQL if they are down,
# then lint, types and every test (unit and integration, real services, real worker processes).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/services.sh --postgres
PY=${PYTHON:-python3}
"$PY" -m ruff check .
"$PY" -m mypy segq producer worker
"$PY" -m pytest -q -ra "$@"
