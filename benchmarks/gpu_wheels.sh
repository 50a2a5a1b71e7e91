#!/usr/bin/env bash
# Download, into .whl/, the CPython 3.12 x86-64 wheels that benchmarks/gpu_tier.sh needs on a GPU image that ships
# torch, transformers, timm, peft, pyarrow, numba and scikit-learn but not the rest of this project's stack (the
# H200 image this project was lent: see benchmarks/RESULTS.md, "GPU tier on an NVIDIA H200"). Versions are the ones
# installed in this checkout's venv, so the GPU run uses what the tests here use. Ray is not among them: its wheel
# (~79 MB) is larger than such a machine's transfer limit, which is why the GPU tier runs no Ray job.
#
# Usage: benchmarks/gpu_wheels.sh            # then, on the GPU machine:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site \
#     benchmarks/gpu_tier.sh
set -euo pipefail
PY=${PY:-.venv/bin/python}
PACKAGES="diffusers boto3 botocore s3transfer jmespath soundfile cffi pycparser importlib_metadata librosa audioread
decorator pooch soxr platformdirs pretty_midi mido importlib_resources tinysoundfont"
pins=()
for name in $PACKAGES; do
  version=$("$PY" -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p')
  [ -n "$version" ] || { echo "$name is not installed in $PY's environment (run make venv first)" >&2; exit 1; }
  pins+=("$name==$version")
done
mkdir -p .whl
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${pins[@]}"
du -sh .whl
