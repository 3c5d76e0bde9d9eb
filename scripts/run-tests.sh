#!/usr/bin/env bash
# Runs the whole test suite in .venv. Called by `make test` (after the venv and system packages
# are in place). PostgreSQL tests run when POPCONTROL_TEST_POSTGRES_URL is set (.ci/run sets it).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -n "${POPCONTROL_TEST_POSTGRES_URL:-}" ] && command -v pg_lsclusters >/dev/null 2>&1; then
  if ! pg_lsclusters --no-header 2>/dev/null | grep -q online; then
    echo "starting the local PostgreSQL cluster"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
  fi
fi

mkdir -p test-output
set +e
.venv/bin/python -m pytest "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure here" >&2
  exit 1
fi
exit "$status"
