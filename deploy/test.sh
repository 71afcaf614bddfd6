#!/usr/bin/env bash
# The test command: installs what is missing, then lint, format check, types, the layers and the whole suite.
# The suite starts its own throw-away servers (broker, S3 server, Temporal, test camera) and
# stops them; it uses the machine's Postgres at 127.0.0.1:5432 when it answers, else a private one.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/bootstrap.sh
export PATH="$PWD/.venv/bin:$PATH"

echo "== ruff"; ruff check . && ruff format --check .
echo "== mypy"; mypy
echo "== import-linter"; lint-imports
echo "== pytest"
set +e
pytest -p no:cacheprovider "$@"
code=$?
set -e
if [[ $code -eq 5 ]]; then
  echo "pytest collected no tests: that is a failure" >&2
  exit 1
fi
exit $code
