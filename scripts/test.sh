#!/usr/bin/env bash
# Install what the tests need, lint, and run the whole suite.  Fails when no test ran.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
python="${PYTHON:-python3}"  # the interpreter setup.sh installed into
"$python" -m ruff check hsmfs tests
set +e
"$python" -m pytest -p no:cacheprovider -ra "$@"
code=$?
set -e
if [ "$code" -eq 5 ]; then
  echo "test.sh: pytest collected no tests: that is a failure" >&2
  exit 1
fi
exit "$code"
