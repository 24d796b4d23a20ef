#!/usr/bin/env bash
# Set up, then run the test suite: two worker processes (a file's tests stay on one), torch at one thread each.
# Extra arguments go to pytest (-n 0: one process).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest tests -n 2 --dist loadfile "$@"
