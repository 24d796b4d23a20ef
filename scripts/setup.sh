#!/usr/bin/env bash
# Set up splitprune on a fresh Debian machine: Fashion-MNIST (Debian package), a virtualenv, the package.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "== installing Fashion-MNIST (apt-get install dataset-fashion-mnist)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist'" >&2
    exit 1
  fi
fi

if ! command -v openssl >/dev/null && [ "$(id -u)" = 0 ]; then  # the TLS tests make their certificates with it
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv"
  python3 -m venv .venv
fi
echo "== installing splitprune and its dependencies into .venv"
# torch is pinned (a CPU wheel): an unpinned torch would pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q --disable-pip-version-check --progress-bar off "torch==2.13.0"
.venv/bin/python -m pip install -q --disable-pip-version-check --progress-bar off -e ".[dev,export,models]"
