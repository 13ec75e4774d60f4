#!/usr/bin/env bash
# The GPU check (scripts/gpu_check.py: stages, timeouts, outputs): `OUT=DIR scripts/gpu_check.sh
# [--dry-run] [--stages a,b]`. $PYTHON, else .venv/bin/python where there is one, else python3.
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python3}
if [[ -z "${PYTHON:-}" && -x .venv/bin/python ]]; then PY=.venv/bin/python; fi
exec "$PY" scripts/gpu_check.py "$@"
