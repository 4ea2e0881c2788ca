#!/usr/bin/env bash
# The whole test suite, from a fresh clone: makes .venv (once), installs tiercache with its
# test extras, makes sure redis-server is there, and runs pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! command -v redis-server >/dev/null 2>&1 && [ -z "${TIERCACHE_REDIS_SERVER:-}" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "redis-server not found: installing it with apt-get" >&2
    apt-get update -qq && apt-get install -y -qq redis-server >/dev/null
  else
    echo "redis-server not found: install it (apt-get install redis-server / brew install redis)" >&2
    exit 1
  fi
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test,lint]"
exec .venv/bin/python -m pytest "$@"
