#!/usr/bin/env bash
# The demo, from a fresh clone: makes .venv (once), installs tiercache with its test extras
# (so fakeredis is there when redis-server is not), and runs `python -m tiercache demo`.
# The demo starts its own redis-server on a free port (or uses fakeredis); it never touches
# a Redis that is already running. Extra arguments go to the demo (e.g. --fake).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
exec .venv/bin/python -m tiercache demo "$@"
