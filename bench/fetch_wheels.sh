#!/usr/bin/env bash
# Fill bench/wheels (git-ignored) with the wheels that bench/gpu_check.sh installs on a GPU machine
# whose image lacks them and which has no network: bitsandbytes (the PEFT+bitsandbytes peer), for
# CPython 3.12 on x86-64 Linux by default (PYTHON_VERSION overrides). Run it where PyPI is reachable.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p bench/wheels
rm -f bench/wheels/bitsandbytes-*.whl  # one version only: gpu_check.sh installs every wheel here
python3 -m pip download --no-deps --only-binary=:all: --implementation cp --python-version "${PYTHON_VERSION:-3.12}" \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    -d bench/wheels "bitsandbytes>=0.50,<0.51"
ls -l bench/wheels
