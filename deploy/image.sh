#!/usr/bin/env bash
# Build deploy/Dockerfile's image for real without a Docker daemon or a registry, run its entrypoint, and
# have a client train and infer against it; probe its gRPC health service and its metrics endpoint.
#   bash deploy/image.sh            # results: bench_results/image/image.json and image.log
# Needs (Debian): buildah, mmdebstrap (apt-get install buildah mmdebstrap), the torch CPU wheel in
# $TORCH_WHEELS (default /opt/wheels), the repository's .venv for the client. Takes ~10-20 min.
# The base image is a Debian bookworm root made by mmdebstrap (python3 3.11, python3-venv), since no
# registry is reachable; with one, `docker build -f deploy/Dockerfile .` uses python:3.11-slim instead.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_results/image}
WORK=${WORK:-/var/tmp/splitprune-image}
WHEELS=${TORCH_WHEELS:-/opt/wheels}
PORT=${PORT:-50515}
METRICS=${METRICS_PORT:-9464}
IMAGE=localhost/splitprune:0.1.0
BASE=localhost/debian-python:bookworm
SP=.venv/bin/splitprune
B=(buildah --storage-driver vfs)
for tool in buildah mmdebstrap; do
  command -v $tool >/dev/null || { echo "image.sh: $tool is missing (apt-get install buildah mmdebstrap)" >&2; exit 2; }
done
ls "$WHEELS"/torch-2.13.0+cpu-*.whl >/dev/null 2>&1 || { echo "image.sh: no torch-2.13.0+cpu wheel in $WHEELS" >&2; exit 2; }
for p in $PORT $METRICS; do
  if (exec 3<>/dev/tcp/127.0.0.1/$p) 2>/dev/null; then echo "image.sh: port $p is in use" >&2; exit 2; fi
done
mkdir -p "$WORK" "$OUT"
log="$OUT/image.log"; : > "$log"
say() { echo "== $*" | tee -a "$log"; }
now() { date +%s.%N; }

say "base: a Debian bookworm root (mmdebstrap), imported as $BASE"
t0=$(now)
if ! "${B[@]}" inspect --type image $BASE >/dev/null 2>&1; then
  mmdebstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$WORK/base.tar" \
    "deb http://deb.debian.org/debian bookworm main" \
    "deb http://deb.debian.org/debian-security bookworm-security main" >> "$log" 2>&1
  ctr=$("${B[@]}" from scratch)
  "${B[@]}" add "$ctr" "$WORK/base.tar" / >> "$log"
  "${B[@]}" config --cmd /bin/bash "$ctr"
  "${B[@]}" commit -q "$ctr" $BASE >> "$log"
  "${B[@]}" rm "$ctr" >> "$log"
fi
t1=$(now)

say "build: deploy/Dockerfile (buildah, chroot isolation, the local torch CPU wheel)"
# the builder's pip settings and CA bundle (e.g. an egress proxy's CA) serve the build's pip; none stay in the image
mounts=(--volume "$WHEELS:/wheels:ro")
[ -f /etc/pip.conf ] && mounts+=(--volume /etc/pip.conf:/etc/pip.conf:ro)
[ -f /etc/ssl/certs/ca-certificates.crt ] && mounts+=(--volume /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro)
"${B[@]}" bud --layers --isolation chroot -f deploy/Dockerfile --build-arg BASE=$BASE --build-arg TORCH_WHEELS=/wheels \
  "${mounts[@]}" -t $IMAGE . >> "$log" 2>&1
t2=$(now)
size=$("${B[@]}" images --format '{{.Size}}' $IMAGE | head -1)

say "run: the image's entrypoint and command, as the container starts them"
words() { "${B[@]}" inspect --type image $IMAGE \
  | .venv/bin/python -c 'import json, shlex, sys; print(shlex.join(json.load(sys.stdin)["OCIv1"]["config"].get(sys.argv[1]) or []))' "$1"; }
entry=$(words Entrypoint)
cmd=$(words Cmd)
user=$("${B[@]}" inspect --type image $IMAGE | .venv/bin/python -c 'import json, sys; print(json.load(sys.stdin)["OCIv1"]["config"].get("User", ""))')
cmd=${cmd//50515/$PORT}; cmd=${cmd//9464/$METRICS}
TOKEN=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
ctr=$("${B[@]}" from $IMAGE)
cleanup() { [ -n "${server:-}" ] && kill "$server" 2>/dev/null; wait 2>/dev/null; "${B[@]}" rm "$ctr" >/dev/null 2>&1 || true; }
trap cleanup EXIT
# chroot isolation shares the host's network: the container's 0.0.0.0:PORT is reachable on 127.0.0.1
"${B[@]}" run --isolation chroot --env SPLITPRUNE_TOKEN="$TOKEN" --env OMP_NUM_THREADS=1 "$ctr" -- \
  $entry $cmd --threads 1 > "$WORK/serve.log" 2>&1 &
server=$!
t3=$(now)
.venv/bin/python - "$PORT" "$METRICS" "$WORK/probes.json" <<'EOF' | tee -a "$log"
import json, sys, time, urllib.request
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
port, metrics, out = sys.argv[1], sys.argv[2], sys.argv[3]
stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
deadline, status = time.monotonic() + 300, None
while time.monotonic() < deadline:
    try:
        status = {s: health_pb2.HealthCheckResponse.ServingStatus.Name(stub.Check(
            health_pb2.HealthCheckRequest(service=s), timeout=2).status) for s in ("", "splitprune.v1.SplitPrune")}
        break
    except grpc.RpcError:
        time.sleep(0.5)
ready_s = 300 - (deadline - time.monotonic())
text = urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10).read().decode()
names = sorted({line.split("{")[0].split()[0] for line in text.splitlines() if line.startswith("splitprune_")})
json.dump({"health": status, "ready_seconds": round(ready_s, 1), "metrics_families": len(names),
           "metrics_sample": names[:8]}, open(out, "w"), indent=2)
print(f"health {status} after {ready_s:.1f} s; metrics: {len(names)} splitprune_ series")
EOF
t4=$(now)

say "client: train ca B=4 over the image's server, pull the whole model, infer against the server"
run="$WORK/run"; rm -rf "$run"
SPLITPRUNE_TOKEN=$TOKEN $SP train --server 127.0.0.1:$PORT --model vgg11_bn_compact --dataset fashion-mnist \
  --method ca --budget 4 --epochs 1 --train-subset 512 --test-subset 256 --threads 1 --quiet --out "$run" \
  2>&1 | tail -3 | tee -a "$log"
t5=$(now)
rm -rf "$WORK/whole"
SPLITPRUNE_TOKEN=$TOKEN $SP pull --server 127.0.0.1:$PORT --checkpoint "$run/checkpoint" --out "$WORK/whole" \
  2>&1 | tail -1 | tee -a "$log"
SPLITPRUNE_TOKEN=$TOKEN $SP infer --server 127.0.0.1:$PORT --checkpoint "$WORK/whole" --budget 4 \
  --test-subset 256 2>&1 | tail -4 | tee "$WORK/infer.txt" | tee -a "$log"
t6=$(now)
metrics_after=$(curl -s http://127.0.0.1:$METRICS/metrics | grep -E '^splitprune_(steps|infer_requests)[a-z_]*_total' | head -4 || true)

say "stop: SIGTERM, as the kubelet stops a pod"
pkill -TERM -f "^/opt/venv/bin/python3? /opt/venv/bin/splitprune serve" || true   # the server inside, not buildah
rc=0; wait $server || rc=$?; server=
tail -3 "$WORK/serve.log" | tee -a "$log"
.venv/bin/python - "$OUT/image.json" "$WORK" "$rc" "$size" "$user" "$entry $cmd" <<EOF
import json, sys
out, work, rc, size, user, command = sys.argv[1:7]
summary = json.load(open(f"{work}/run/summary.json"))
json.dump({
    "command": "bash deploy/image.sh",
    "image": "$IMAGE", "base": "$BASE (mmdebstrap bookworm minbase + python3, python3-venv)",
    "image_size": size, "user": user, "container_command": command,
    "seconds": {"base": round($t1 - $t0, 1), "build": round($t2 - $t1, 1), "start_to_serving": round($t4 - $t3, 1),
                "train": round($t5 - $t4, 1), "infer": round($t6 - $t5, 1)},
    "probes": json.load(open(f"{work}/probes.json")),
    "train": {k: summary.get(k) for k in ("method", "final_budget", "final_test_accuracy", "bytes_up", "bytes_down",
                                                   "train_samples", "test_samples")},
    "infer": open(f"{work}/infer.txt").read().strip().splitlines(),
    "metrics_after": """$metrics_after""".strip().splitlines(),
    "serve_exit_code": int(rc), "serve_log_tail": open(f"{work}/serve.log").read().strip().splitlines()[-3:],
}, open(out, "w"), indent=2)
print(open(out).read())
EOF
