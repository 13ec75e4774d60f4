#!/usr/bin/env bash
# Fill .whl/ (ignored by git) with the wheels the GPU machine lacks, for scripts/gpu_check.py.
#
# That machine (device kind nvidia-h200) has no package registry; its python3 (3.12) holds
# torch, triton, transformers, tokenizers, safetensors, numpy, Pillow, jinja2, httpx, anyio, h11,
# click, uvloop, prometheus-client, annotated-doc and huggingface-hub, but not the HTTP server
# or llguidance. WHEELS below is exactly what is missing: pyproject.toml's dependencies and
# their Requires-Dist (read with `unzip -p W.whl '*/METADATA' | grep ^Requires-Dist`), pinned
# to the versions CI tests. typing-extensions travels too: pydantic 2.14 needs >= 4.16, newer
# than the image may hold. About 6.6 MiB in all (the tool carries at most 64 MiB a call).
#
#   scripts/gpu_wheels.sh         # here, with PyPI access; needs pip
#
# Then one device call runs the whole check (gpu_check.py installs .whl/*.whl into
# /tmp/gpu-check-site and puts it on PYTHONPATH itself):
#   run(command="scripts/gpu_check.sh", carry=[".whl"], timeout_s=560)   # the tool sets $OUT
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [[ -z "${PYTHON:-}" && -x .venv/bin/python ]]; then PY=.venv/bin/python; fi
WHEELS=(
  fastapi==0.165.0 starlette==1.10.0 opentelemetry-api==1.45.2
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  typing-extensions==4.16.0
  uvicorn==0.55.0 httptools==0.9.0
  llguidance==1.9.1
)
platforms=()
# pip matches manylinux_2_N exactly: name each N a wheel may carry (llguidance's is 2_31)
for tag in manylinux1 manylinux2014 manylinux_2_17 manylinux_2_24 manylinux_2_27 manylinux_2_28 \
  manylinux_2_31 manylinux_2_34 manylinux_2_35; do
  platforms+=(--platform "${tag}_x86_64")
done
rm -rf .whl && mkdir -p .whl  # one version of each: two would stop the install there
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl "${WHEELS[@]}"
n=$(find .whl -type f -name '*.whl' | wc -l)
if (( n != ${#WHEELS[@]} )); then
  echo "expected ${#WHEELS[@]} wheels, got $n" >&2
  exit 1
fi
du -sh .whl
