#!/usr/bin/env bash
# Set up, then run the main job: what splitprune is for, in about three minutes. Plain split learning (sl: every
# channel of the cut, fp32) and compression-aware split learning (ca: 4 of the 512 channels, fp16) train on the
# same Fashion-MNIST images; one figure shows both on the same axes: accuracy per epoch, and accuracy against the
# training traffic it cost.
#   bash scripts/demo.sh [--threads N]   2,000 training images, 2 epochs each (lr decaying to ~0), 1,000 test
#                                        images -> runs/demo/{sl,ca4}, runs/demo/compare.png
#   bash scripts/demo.sh --full          the paper's schedule (22 epochs at a constant lr) on all 60,000 images,
#                                        the full test set -> runs/demo-full (hours on 2 cores; resumable)
# Threads: by default the cores other processes leave idle (said when the machine is busy).
# For other settings, use `splitprune train` itself (README, Usage).
set -euo pipefail
cd "$(dirname "$0")/.."
full=0 threads=""
while [ $# -gt 0 ]; do
  case "$1" in
    --full) full=1; shift ;;
    --threads) [ $# -ge 2 ] || { echo "usage: bash scripts/demo.sh [--full] [--threads N]" >&2; exit 2; }
               threads="$2"; shift 2 ;;
    *) echo "usage: bash scripts/demo.sh [--full] [--threads N]" >&2; exit 2 ;;
  esac
done
bash scripts/setup.sh

if [ -z "$threads" ]; then
  read -r threads note < <(.venv/bin/python -c "
import os
from splitprune.cli.common import idle_cores
cores, load, n = os.cpu_count() or 1, os.getloadavg()[0], idle_cores()
print(n, f'the machine is busy (load {load:.1f} on {cores} cores): training with {n} thread(s), --threads N to change'
      if n < cores else '')")
  [ -n "$note" ] && echo "== $note"
fi

out=runs/demo
args=(--train-subset 2000 --test-subset 1000 --epochs 2 --lr-schedule cosine)
if [ "$full" = 1 ]; then
  out=runs/demo-full
  args=(--epochs 22)
fi
.venv/bin/splitprune train --method sl "${args[@]}" --threads "$threads" --out "$out/sl"
.venv/bin/splitprune train --method ca --budget 4 "${args[@]}" --threads "$threads" --out "$out/ca4"
.venv/bin/splitprune plot "$out/sl" "$out/ca4"
