"""Peak server memory under worst-case concurrent requests, with and without the server-wide budget
(`serve --max-inflight-mb`, issue 25 item 4):

    python -m splitprune.bench.systems.admission --out bench_results/admission

A `splitprune serve` subprocess hosts H halves (one per seed, ca B=1 int4: a request of the largest
training batch is a ~4 KB message); H threads each send a request of that batch to their own half at
the same moment, for R rounds: training steps (forward and backward), the costliest request there is.
One warm-up step per half first, one half at a time: a half's first step makes its gradients and
momentum, which it keeps (state per half, bounded by --max-models, not by this budget). Peak RSS (VmHWM) over the rounds against the RSS before them, for each
--max-inflight-mb: unbounded (H x --max-request-mb) and smaller budgets.
"""
from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

HALVES, ROUNDS, REQUEST_MB = 4, 3, 256
CONFIG = dict(model="vgg11_bn_compact", dataset="fashion-mnist", method="ca", budget=1, dtype_up="int4", epochs=1,
              train_subset=32, test_subset=16, batch_size=16, test_batch_size=16, threads=1)


def measure(budget_mb: float, halves: int, rounds: int, log: Path) -> dict:
    import torch

    from splitprune.bench.core.processes import ServeSubprocess, free_port, memory
    from splitprune.bench.systems.fuzzing import Fuzzer, _Refused
    from splitprune.compression import ChannelCodec, encode_labels
    from splitprune.config import make_config
    from splitprune.proto import pb
    from splitprune.proto import service_pb2 as spb
    from splitprune.wire.envelopes import frame

    server = ServeSubprocess(free_port(), "--max-models", str(halves), "--max-request-mb", str(REQUEST_MB),
                             "--max-inflight-mb", f"{budget_mb:g}", "--admission-wait", "120", log_path=log).start()
    fuzzers, streams = [], []
    try:
        for seed in range(halves):
            cfg = make_config({**CONFIG, "seed": seed})
            fuzzer = Fuzzer(server.address, cfg, stream_timeout=3600)
            live = fuzzer._session(f"rss-{seed}")
            info = spb.DescribeReply.FromString(fuzzer.unary["describe"](
                spb.DescribeRequest(fingerprint=cfg.fingerprint()).SerializeToString(), timeout=60))
            n = info.max_train_batch
            values = torch.randn(n, 1, 4, 4, generator=torch.Generator().manual_seed(seed))
            tensor = ChannelCodec(cfg.dtype_up).compress(values, torch.tensor([0]), 512)
            labels = encode_labels(torch.arange(n) % 10)
            fuzzers.append(fuzzer)
            streams.append((live, [frame(3, pb.TrainRequest(step_id=live.last_step + 1 + r, activations=tensor,
                                                              labels=labels).SerializeToString())
                                   for r in range(rounds + 1)]))
        time.sleep(1.0)
        fresh = memory(server.proc.pid)
        for live, requests in streams:  # warm-up, one half at a time: gradients and momentum now exist
            live.stream.exchange(requests[0])
        time.sleep(1.0)
        before = memory(server.proc.pid)
        start, errors, seconds = threading.Barrier(halves, timeout=1800), [], []

        def client(live, requests):
            try:
                for request in requests:
                    start.wait()
                    t = time.perf_counter()
                    live.stream.exchange(request)
                    seconds.append(time.perf_counter() - t)
            except (_Refused, threading.BrokenBarrierError) as exc:
                errors.append(repr(exc))
                start.abort()  # the others stop waiting for this one

        threads = [threading.Thread(target=client, args=(live, requests[1:])) for live, requests in streams]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        after = memory(server.proc.pid)
        max_batch, message = info.max_train_batch, len(streams[0][1][0])
    finally:
        for f in fuzzers:
            f.close()
        server.stop()
    return {"max_inflight_mb": budget_mb, "halves": halves, "rounds": rounds, "max_batch": max_batch,
            "request_message_bytes": message, "rss_fresh_mib": round(fresh["VmRSS"] / 2**20, 1),
            "rss_before_mib": round(before["VmRSS"] / 2**20, 1),
            "peak_rss_mib": round(after["VmHWM"] / 2**20, 1),
            "peak_growth_mib": round((after["VmHWM"] - before["VmRSS"]) / 2**20, 1),
            "peak_before_mib": round(before["VmHWM"] / 2**20, 1),
            "request_seconds_median": round(sorted(seconds)[len(seconds) // 2], 3) if seconds else None,
            "request_seconds_max": round(max(seconds), 3) if seconds else None, "errors": errors}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench_results/admission")
    p.add_argument("--halves", type=int, default=HALVES)
    p.add_argument("--rounds", type=int, default=ROUNDS)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    budgets = [args.halves * REQUEST_MB, 2 * REQUEST_MB, REQUEST_MB]
    rows = []
    for budget in budgets:
        rows.append(measure(budget, args.halves, args.rounds, out / f"serve-{budget}.log"))
        print(json.dumps(rows[-1]), flush=True)
    command = "python -m splitprune.bench.systems.admission --out " + str(out) + (
        f" --halves {args.halves}" if args.halves != HALVES else "") + (
        f" --rounds {args.rounds}" if args.rounds != ROUNDS else "")
    (out / "admission.json").write_text(json.dumps({"command": command, "request_mb": REQUEST_MB, "rows": rows},
                                                   indent=2))
    lines = ["| --max-inflight-mb | halves x rounds | largest training batch (message) | RSS: halves built / after "
             "warm-up | peak RSS | peak growth over warm-up | request s, median / max |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['max_inflight_mb']:g}{' (unbounded: halves x 256)' if r is rows[0] else ''} | "
                     f"{r['halves']} x {r['rounds']} | {r['max_batch']} ({r['request_message_bytes']:,} B) | "
                     f"{r['rss_fresh_mib']} / {r['rss_before_mib']} MiB | {r['peak_rss_mib']} MiB | **+{r['peak_growth_mib']} MiB** | "
                     f"{r['request_seconds_median']} / {r['request_seconds_max']} |")
    (out / "admission.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
