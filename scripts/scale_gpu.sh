#!/usr/bin/env bash
# `splitprune bench scale` with both servers computing on the GPU (--accelerator cuda), on ONE GPU
# machine (H100/H200, 16 cores). Not run on the 2-core development machine (no GPU there).
#
#   OUT=/some/dir bash scripts/scale_gpu.sh        # from the repository root; results under $OUT
#
# The clients stay threads of the bench process on the CPU, one gRPC channel each (as on CPU); only the
# servers' halves move to the GPU. About 4 minutes (3 workloads x 4 client counts x 2 repeats x 2
# servers, 3.5 s a cell, plus start-up). What comes back, directly under $OUT:
#   scale_gpu.tar.gz   bench_results/scale/ (scale.json, scale.csv, scale.md, scale.png, server logs)
#   scale_gpu.md       the tables and the verdict;  scale_gpu_log.txt  everything printed
# Extract at the repository root as bench_results/scale-gpu/ to keep the CPU results:
#   mkdir -p bench_results/scale-gpu && tar xzf scale_gpu.tar.gz -C bench_results/scale-gpu --strip-components 2
#
# Knobs (environment): PROFILE (quick: vgg11_bn_compact on Fashion-MNIST activations, default; paper:
# vgg11_bn on CIFAR-10), TOTAL_S (wall limit, default 540), DATA_DIR (the dataset's files; default
# ./.gpu_data/fashion-mnist, then /usr/share/datasets/fashion-mnist), PYTHON (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/scale_gpu_out}
PYTHON=${PYTHON:-python3}
PROFILE=${PROFILE:-quick}
TOTAL_S=${TOTAL_S:-540}
WORK=$(mktemp -d /tmp/scale_gpu.XXXXXX)
mkdir -p "$OUT"
LOG="$OUT/scale_gpu_log.txt"
DATA=""
for d in "${DATA_DIR:-}" "$PWD/.gpu_data/fashion-mnist" /usr/share/datasets/fashion-mnist; do
  if [ -n "$d" ] && [ -d "$d" ]; then DATA="$d"; break; fi
done
{
  echo "data: ${DATA:-default}; profile $PROFILE; $(uptime)"
  PYTHONPATH=. "$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"
} 2>&1 | tee "$LOG"
[ "${PIPESTATUS[0]}" -eq 0 ] || exit 2
PYTHONPATH=. timeout "$TOTAL_S" "$PYTHON" -m splitprune bench scale --profile "$PROFILE" --accelerator cuda \
  ${DATA:+--data-dir "$DATA"} --out "$WORK/bench_results" 2>&1 | tee -a "$LOG"
status=${PIPESTATUS[0]}
echo "exit $status; $(uptime)" | tee -a "$LOG"
if [ -d "$WORK/bench_results/scale" ]; then
  tar czf "$OUT/scale_gpu.tar.gz" -C "$WORK" bench_results/scale
  cp "$WORK/bench_results/scale/scale.md" "$OUT/scale_gpu.md" 2>/dev/null || true
fi
exit "$status"
