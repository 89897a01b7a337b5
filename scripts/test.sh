#!/usr/bin/env bash
# Installs parley with its test extra into .venv and runs the whole suite against SQLite, then PostgreSQL.
# Needs PostgreSQL on 127.0.0.1:5432 (trust auth, user postgres) and Redis on 127.0.0.1:6379.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k threads`).
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test]'

export PARLEY_TEST_REQUIRE_SERVICES=1
status=0
for backend in sqlite postgresql; do
  echo "== tests on ${backend} =="
  PARLEY_TEST_DATABASE="${backend}" .venv/bin/python -m pytest -q -p no:cacheprovider "$@" || status=1
done
exit "${status}"
