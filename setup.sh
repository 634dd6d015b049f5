#!/usr/bin/env bash
# Fresh Debian 12 -> ready to run: system libraries for ffcv, the real Fashion-MNIST files, a venv with
# everything in requirements.txt. Idempotent: re-running skips what is already there.
set -euo pipefail
cd "$(dirname "$0")"

apt_pkgs=(pkg-config libopencv-dev libturbojpeg0-dev dataset-fashion-mnist python3-venv)
missing=()
for p in "${apt_pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  echo "setup: apt-get install ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PY --version)"
  $PY -m venv .venv
fi
stamp=.venv/.requirements.sha
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ "$(cat $stamp 2>/dev/null)" != "$want" ]; then
  echo "setup: pip install -r requirements.txt (first time: several minutes, ffcv compiles)"
  .venv/bin/python -m pip install -q --upgrade pip wheel setuptools
  # numpy and torch first: ffcv's build imports numpy.
  .venv/bin/python -m pip install -q numpy 'torch>=2.11,<2.15' 'torchvision>=0.26,<0.30'
  .venv/bin/python -m pip install -q --no-build-isolation ffcv==1.0.2 || .venv/bin/python -m pip install -q ffcv==1.0.2
  .venv/bin/python -m pip install -q -r requirements.txt
  echo "$want" > $stamp
fi
