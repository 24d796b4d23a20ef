#!/usr/bin/env bash
# Set up, then run the main job: a short deprune run on Fashion-MNIST that ends with its results table and a
# plot (about 2.7 minutes on an idle 2-core machine once set-up is done: 160 s measured for the run).
#   bash scripts/demo.sh             the short run: 3,000 training images, B=4 for 3 epochs then all channels
#                                    for 1, each phase's lr decaying to ~0 (cosine: a short run's BatchNorm
#                                    statistics then settle), each epoch evaluated on 2,000 test images -> runs/demo
#   bash scripts/demo.sh --full      the paper's schedule (B=4 for 15 epochs, then all channels for 7) on all
#                                    60,000 images, each epoch on the full 10,000 test images -> runs/demo-full
#                                    (hours on 2 cores; stop it any time and start it again: it resumes)
# For other settings, use `splitprune train` itself (README, Usage).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -gt 1 ] || { [ $# = 1 ] && [ "$1" != "--full" ]; }; then
  echo "usage: bash scripts/demo.sh [--full]" >&2
  exit 2
fi
bash scripts/setup.sh

out=runs/demo
args=(--method deprune --schedule 4:3,all:1 --lr-schedule cosine --train-subset 3000 --test-subset 2000)
if [ "${1:-}" = "--full" ]; then
  out=runs/demo-full
  args=(--method deprune)
fi
.venv/bin/splitprune train "${args[@]}" --out "$out"
.venv/bin/splitprune plot "$out"
