#!/usr/bin/env bash
# Set up, then run the main job: a short deprune run on Fashion-MNIST ending with a results table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/splitprune train --method deprune --schedule 4:3,all:1 --train-subset 6000 --out runs/demo "$@"
