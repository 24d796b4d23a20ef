#!/usr/bin/env bash
# Paper-profile benchmark run on ONE GPU machine (H100/H200, 16 cores), time-boxed.
#
#   OUT=/some/dir bash scripts/paper_gpu.sh        # from the repository root; results under $OUT
#
# vgg11_bn (the paper's 120M-parameter head), cut at conv5, the paper's schedules (sl all:22, ca 4:22,
# deprune 4:15,all:7, prune 32:10,4:10 from the sl model, lr 1e-3 momentum 0.9) on a Fashion-MNIST
# training subset (PAPER_TRAIN_SUBSET, default 4000), full 10k test set for the headline numbers.
# Phase 1 trains sl and the from-scratch runs compared with it, in parallel processes on the one GPU;
# phase 2 (prune, the rate suite's prune chain and baselines, and the remaining from-scratch runs)
# starts as soon as sl is done, or from sl's last finished epoch once PHASE2_AT of the training time
# has passed. At the training deadline every run is
# interrupted (SIGINT: the last finished epoch is kept) and the reports are made from what finished,
# partial runs marked complete=false. Nothing here needs the package installed: PYTHONPATH=. only.
#
# What comes back (at most 8 files, all directly under $OUT):
#   paper_results.tar.gz   bench_results/paper/<suite>/... (JSON, CSV, PNG, markdown, per-run metrics; no weights)
#   paper_summary.md       the suites' markdown tables, concatenated
#   paper_log.txt          this script's log, every process's output included
# Extract at the repository root: tar xzf paper_results.tar.gz  (-> bench_results/paper/...)
#
# Knobs (environment): TOTAL_S (wall budget of the whole script, default 480), ANALYSIS_S (reserved for
# the reports, default 90), PHASE2_AT (fraction of the training window after which phase 2 starts
# from a partial sl, default 0.6), PAPER_TRAIN_SUBSET, PAPER_EPOCHS (from-scratch epochs, default 22),
# PAPER_THREADS (torch CPU threads per run, default 1), DATA_DIR (Fashion-MNIST IDX files; default
# ./.gpu_data/fashion-mnist, then /usr/share/datasets/fashion-mnist), PYTHON (default python3).
# SMOKE=1: the same logic on CPU with tiny sizes (vgg11_bn_compact) to check the script itself.
# The profile's knobs (PAPER_*, SMOKE, the data folder) reach every `python -m splitprune.bench`
# process started here as flags (PROFILE_FLAGS: --train-subset, --epochs, --threads, --smoke, --data-dir).
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
OUT=${OUT:-/tmp/paper_out}
WORK=${WORK:-/tmp/paper_work}
PYTHON=${PYTHON:-python3}
TOTAL_S=${TOTAL_S:-480}
ANALYSIS_S=${ANALYSIS_S:-90}
PHASE2_AT=${PHASE2_AT:-0.6}
mkdir -p "$OUT" "$WORK"
LOG="$OUT/paper_log.txt"
: > "$LOG"
log() { echo "[$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PROFILE_FLAGS=(--profile paper --threads "${PAPER_THREADS:-1}")
[ -n "${PAPER_TRAIN_SUBSET:-}" ] && PROFILE_FLAGS+=(--train-subset "$PAPER_TRAIN_SUBSET")
[ -n "${PAPER_EPOCHS:-}" ] && PROFILE_FLAGS+=(--epochs "$PAPER_EPOCHS")
if [ "${SMOKE:-0}" = "1" ]; then
  PROFILE_FLAGS+=(--smoke)
  TOTAL_S=${SMOKE_TOTAL_S:-240}; ANALYSIS_S=${SMOKE_ANALYSIS_S:-90}
fi
DATA=""
for d in "${DATA_DIR:-}" "$PWD/.gpu_data/fashion-mnist" /usr/share/datasets/fashion-mnist; do
  if [ -n "$d" ] && [ -e "$d/train-images-idx3-ubyte.gz" -o -e "$d/train-images-idx3-ubyte" ]; then
    DATA="$d"; break
  fi
done
if [ -z "$DATA" ]; then
  log "no Fashion-MNIST IDX files found (set DATA_DIR, or put them in .gpu_data/fashion-mnist/)"; exit 2
fi
PROFILE_FLAGS+=(--data-dir "$DATA")
USE_PARTIAL=""  # set once phase 2 has to start from a stopped sl: --use-partial for the runs started after

ROOT="$WORK/bench_results/paper"
mkdir -p "$ROOT" "$WORK/logs"
log "data: $DATA; results: $ROOT; budget ${TOTAL_S}s (reports ${ANALYSIS_S}s); flags: ${PROFILE_FLAGS[*]}"
$PYTHON - "${PROFILE_FLAGS[@]}" <<'EOF' 2>&1 | tee -a "$LOG"
import platform, sys, torch
print("torch", torch.__version__, "python", platform.python_version(), "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
from splitprune.bench.__main__ import build_parser
from splitprune.bench.core.profiles import profile_from_args
print("profile", profile_from_args(build_parser().parse_args(sys.argv[1:])).settings())
EOF

TRAIN_END=$(( START + TOTAL_S - ANALYSIS_S ))
# Phase 1 holds sl and the runs it is compared with; phase 2 the runs that start from sl, plus three
# independent runs moved there so that fewer processes share the GPU while sl trains (on an H200, 9
# processes got ~360 samples/s each, ~3,300 samples/s together).
# Every headline run at seeds 0 and 1 (NAME, NAME_seed1); prune_seed1 starts from sl_seed1.
PHASE1=(sl sl_seed1 ca4 ca4_seed1 deprune deprune_seed1)
PHASE2=(prune prune_seed1 chain random2 bottleneck2 ca1_i8 ca1_i8_seed1 ca4_r2 ca4_r2_seed1)
declare -A PIDS

launch() {  # launch NAME: train one run in its own process until the training deadline
  local name=$1 left=$(( TRAIN_END - $(date +%s) ))
  if [ "$left" -le 5 ]; then log "no time left for $name"; return; fi
  timeout -s INT -k 20 "$left" $PYTHON -m splitprune.bench "${PROFILE_FLAGS[@]}" ${USE_PARTIAL:+--use-partial} \
    --out "$ROOT" "$name" > "$WORK/logs/$name.log" 2>&1 &
  PIDS[$name]=$!
  log "started $name (pid ${PIDS[$name]}, ${left}s left)"
}

for name in "${PHASE1[@]}"; do launch "$name"; done

# phase 2 starts when sl is done, or from sl's last finished epoch at PHASE2_AT of the training window
PHASE2_DEADLINE=$(( START + $(awk -v a="$PHASE2_AT" -v t="$(( TRAIN_END - START ))" 'BEGIN{printf "%d", a*t}') ))
for sl in sl sl_seed1; do
  while [ ! -f "$ROOT/deprune/runs/$sl/summary.json" ] && [ "$(date +%s)" -lt "$PHASE2_DEADLINE" ]; do
    if ! kill -0 "${PIDS[$sl]:-0}" 2>/dev/null; then break; fi
    sleep 2
  done
  if [ ! -f "$ROOT/deprune/runs/$sl/summary.json" ]; then
    log "$sl not finished at the phase-2 start: stopping it, phase 2 starts from its last finished epoch"
    if [ -n "${PIDS[$sl]:-}" ]; then
      kill -INT "${PIDS[$sl]}" 2>/dev/null; wait "${PIDS[$sl]}" 2>/dev/null
      log "$sl stopped (exit $?)"; unset "PIDS[$sl]"
    fi
    USE_PARTIAL=1
  fi
done
if [ -f "$ROOT/deprune/runs/sl/checkpoint/meta.json" ]; then
  for name in "${PHASE2[@]}"; do launch "$name"; done
else
  log "no sl checkpoint: phase 2 skipped"
fi

for name in "${!PIDS[@]}"; do
  wait "${PIDS[$name]}"; rc=$?
  log "$name finished (exit $rc$( [ $rc = 124 ] || [ $rc = 130 ] && echo ': stopped at the deadline'))"
done
for name in "${PHASE1[@]}" "${PHASE2[@]}"; do
  [ -f "$WORK/logs/$name.log" ] && { echo "----- $name" >> "$LOG"; tail -n 40 "$WORK/logs/$name.log" >> "$LOG"; }
done

log "reports"
SUITE_LEFT=$(( START + TOTAL_S - $(date +%s) - 10 ))
timeout -s INT -k 10 "$(( SUITE_LEFT > 20 ? SUITE_LEFT : 20 ))" \
  $PYTHON -m splitprune.bench "${PROFILE_FLAGS[@]}" --no-train --out "$ROOT" --suite deprune prune resolution rate \
  >> "$LOG" 2>&1
REPORTS_RC=$?
log "reports done (exit $REPORTS_RC)"

cat "$ROOT"/*/*.md > "$OUT/paper_summary.md" 2>/dev/null
tar czf "$OUT/paper_results.tar.gz" --exclude=checkpoint --exclude='checkpoint.*' --exclude=models \
  -C "$WORK" bench_results/paper
log "wrote $OUT/paper_results.tar.gz ($(du -h "$OUT/paper_results.tar.gz" | cut -f1)), total $(( $(date +%s) - START ))s"
exit "$REPORTS_RC"  # what finished is packaged either way; a failed report still fails the script
