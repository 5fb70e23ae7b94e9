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
# timm and torchvision without their deps: their declared deps would replace the pinned torch.
pip install -q --disable-pip-version-check --no-deps -r requirements-nodeps.txt
pip install -q --disable-pip-version-check --no-build-isolation -e .
