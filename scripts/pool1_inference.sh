#!/bin/bash
# (the early-cut benchmark of issue 26; TARGETS="200 500" for both targets; the run: bench_results/adaptive_pool1/runs/anybudget)
# adaptive inference of the pool1 any-budget model over every shipped trace at 200 and 500 ms; background
# training and evaluation processes are paused (SIGSTOP) while a trace runs for real, resumed between traces
cd "$(dirname "$0")/.."
OUT=bench_results/adaptive_pool1
pause() { for p in $(pgrep -f "splitprune train|bench.adaptive.accuracy"); do kill -STOP $p; done; }
resume() { for p in $(pgrep -f "splitprune train|bench.adaptive.accuracy"); do kill -CONT $p; done; }
trap resume EXIT
for ms in ${TARGETS:-200}; do
  OMP_NUM_THREADS=1 .venv/bin/python -u -c "
from splitprune.bench.adaptive.inference import run_adaptive_inference
run_adaptive_inference('$OUT/runs/anybudget/checkpoint', '$OUT/inference_${ms}ms', latency_ms=$ms)
" 2>&1 | while IFS= read -r line; do
    echo "$line"
    case "$line" in "trace "*"over a real link"*) pause; echo "[paused background at $(date +%T)]";;
                    *"verdict"*|*"reaction"*) resume;; esac
  done
  resume
done
