#!/bin/bash
# (the early-cut benchmark of issue 26; TARGETS="200 500" for both targets; the run: bench_results/adaptive_pool1/runs/anybudget;
#  --render: only write TARGETS' adaptive_infer.md again from its adaptive_infer.json)
# adaptive inference of the pool1 any-budget model over every shipped trace at 200 and 500 ms; background
# training and evaluation processes are paused (SIGSTOP) while a trace runs for real, resumed between traces
cd "$(dirname "$0")/.."
OUT=bench_results/adaptive_pool1
pause() { for p in $(pgrep -f "splitprune train|bench.adaptive.accuracy"); do kill -STOP $p; done; }
resume() { for p in $(pgrep -f "splitprune train|bench.adaptive.accuracy"); do kill -CONT $p; done; }
trap resume EXIT
# the run's tables as markdown, and the command that made them in its JSON
render() { .venv/bin/python -c "
import json, pathlib
from splitprune.bench.adaptive.inference import report_trace
out = pathlib.Path('$OUT/inference_$1ms')
doc = json.loads((out / 'adaptive_infer.json').read_text())
doc['command'] = 'TARGETS=$1 bash scripts/pool1_inference.sh'
(out / 'adaptive_infer.json').write_text(json.dumps(doc, indent=2))
tick = chr(96)
head = (tick + doc['command'] + tick + ' (background training paused while a trace runs for real)\\n\\n'
        'pool1 any-budget model, target $1 ms, %d test images cycled; every option\\'s accuracy on the full 10k '
        'test set\\n\\n' % doc['test_samples'])
(out / 'adaptive_infer.md').write_text(head + '\n'.join(report_trace(r) for r in doc['traces']))
"; }
[ "$1" = "--render" ] && { render "${TARGETS:-200}"; exit; }
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
  render $ms
done
