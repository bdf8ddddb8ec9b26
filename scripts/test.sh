#!/usr/bin/env bash
# Install (scripts/install.sh), lint, and run the whole test suite. As root.
#
#   bash scripts/test.sh [PYTEST ARGS...]      e.g.  bash scripts/test.sh -m e2e -x
#
# Exits with pytest's exit code. A run that collected no tests (pytest exit code 5) fails with
# a message: a suite that ran nothing must never look like a pass.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${LAYERSTORE_VENV:-$REPO/.venv}

bash "$REPO/scripts/install.sh"
cd "$REPO"

echo "test.sh: ruff check ." >&2
"$VENV/bin/ruff" check .

# `python -m pytest` from the repository root puts it on sys.path, so `tests.harness` imports.
echo "test.sh: pytest -ra $*" >&2
set +e
"$VENV/bin/python" -m pytest -ra "$@"
rc=$?
set -e
if [ "$rc" -eq 0 ]; then
  # The README's compatibility table is rendered from this run's e2e results.
  "$VENV/bin/python" scripts/compat_table.py --write || true
fi
if [ "$rc" -eq 5 ]; then
  echo "test.sh: FAILED: pytest collected no tests (exit code 5); a suite that ran nothing" \
    "must not pass" >&2
fi
exit "$rc"
