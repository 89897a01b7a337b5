#!/usr/bin/env bash
# Installs parley with its test extra into .venv and runs the whole suite against SQLite, then PostgreSQL.
# Needs PostgreSQL on 127.0.0.1:5432 (trust auth, user postgres), Redis on 127.0.0.1:6379, and Debian's
# chromium (installed here with apt-get when missing and run as root).
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k threads`).
set -euo pipefail
cd "$(dirname "$0")/.."

# The browser tests drive Debian's Chromium (never a downloaded browser).
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    apt-get install -y -q chromium >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }
  else
    echo "the browser tests need Chromium: sudo apt-get install -y chromium" >&2
    exit 1
  fi
fi

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
