#!/usr/bin/env bash
# Everything downstream with a torchvision model (issue 23 item 5): anybudget over a real server, pull, eval at
# several budgets, export (every budget), serve --model with batching, infer at a budget and auto, the
# torch-free device package at two budgets.
set -euo pipefail
cd "$(dirname "$0")/.."
SP=".venv/bin/splitprune"
D=/tmp/ds; rm -rf $D; mkdir -p $D
M=(--model torchvision:mobilenet_v3_small --split features.3 --input-size 32)
S=(--train-subset 96 --test-subset 64 --threads 1 --quiet --bn-calibration 32)
$SP serve --listen 127.0.0.1:50741 --allow-model 'torchvision:*' --threads 1 --quiet > $D/serve1.log 2>&1 &
SERVE=$!; sleep 8
echo "== anybudget over a real server"
$SP train "${M[@]}" --method anybudget --epochs 1 "${S[@]}" --server 127.0.0.1:50741 --out $D/any
echo "== pull"; $SP pull --server 127.0.0.1:50741 --checkpoint $D/any/checkpoint --out $D/whole
R=$D/whole
kill $SERVE 2>/dev/null; wait $SERVE 2>/dev/null || true
echo "== eval at B=1, 4 and all"
for b in 1 4 all; do $SP eval --checkpoint $R --budget $b --quiet; done
echo "== export every budget"
$SP export --checkpoint $R --out $D/export --budget 1,2,4,8,all --check-images 16 | tail -7
ls $D/export
echo "== serve --model (batching) + infer"
$SP serve --listen 127.0.0.1:50742 --model $R --batch-window-ms 5 --threads 1 --quiet > $D/serve2.log 2>&1 &
SERVE=$!; sleep 10
$SP infer --server 127.0.0.1:50742 --checkpoint $R --budget 2 --test-subset 64 | tail -4
$SP infer --server 127.0.0.1:50742 --checkpoint $R --budget auto --latency-ms 200 --duration 5 | tail -4
echo "== device package (no torch in the device code path)"
.venv/bin/python - <<'PY'
import numpy as np
from splitprune.inputs import read_idx
imgs = read_idx("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")[:8]
np.save("/tmp/ds/imgs.npy", imgs)
PY
for b in 1 8; do PYTHONPATH=device .venv/bin/python -m splitprune_device infer --server 127.0.0.1:50742 --model $D/export --budget $b $D/imgs.npy | tail -3; done
kill $SERVE 2>/dev/null; wait $SERVE 2>/dev/null || true
