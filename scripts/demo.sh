#!/usr/bin/env bash
# The main job: install, then show hsmfs serving an S3 bucket through both doors.
# With no --endpoint, an embedded S3 server (moto) is started with sample data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >&2
exec python3 -m hsmfs demo "$@"
