#!/usr/bin/env bash
# Installs eventful-kernels and everything it needs into ./.venv (created if missing). Idempotent.
# torch is pinned to the CPU wheel 2.13.0 first, so nothing later can pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --disable-pip-version-check torch==2.13.0
# requirements.txt includes ray (core only) for eventful_kernels.serve: ~45 s, no torch among its dependencies.
pip install -q --disable-pip-version-check -r requirements.txt
# timm, torchvision, transformers ... without their deps: timm's and torchvision's would replace the pinned torch.
# --no-compile: transformers ships ~4000 modules; byte-compiling them all costs minutes on 2 cores, while an import
# compiles (and caches) only the few it uses.
pip install -q --disable-pip-version-check --no-deps --no-compile -r requirements-nodeps.txt
pip install -q --disable-pip-version-check --no-build-isolation -e .
