"""Device suite: the exported ONNX device half and the PyTorch-free package against their PyTorch originals.

- footprint: two fresh virtualenvs, built for real: the device package alone, and the `splitprune`
  package (torch); their size on disk, and one end-to-end run of `splitprune-device infer` from the first
  against `splitprune serve` on loopback;
- agreement: over the full Fashion-MNIST test set at every exported budget, the uplink message of each
  image (batch 1, as the device sends it) from the ONNX device half vs from the PyTorch device half, and
  the predictions the (same, PyTorch) server half makes from each;
- latency: the device half alone at batch 1 on 1 thread: onnxruntime vs PyTorch, interleaved rounds.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from splitprune.bench.core.common import markdown_table, write_results
from splitprune.bench.core.profiles import Profile, profile_name

BUDGETS = [1, 2, 4]
TRAIN_ARGS = ["--method", "ca", "--budget", "4", "--epochs", "1", "--train-subset", "2000", "--threads", "1"]
VENV_ROOT = Path("/tmp/splitprune-bench-device")
FASHION = Path("/usr/share/datasets/fashion-mnist")
REPO = Path(__file__).resolve().parents[2]


def train_model(out: Path) -> Path:
    run = out / "runs" / "ca4"
    command = ["train", *TRAIN_ARGS, "--quiet", "--out", str(run)]
    if not (run / "summary.json").exists() and \
            subprocess.run([sys.executable, "-m", "splitprune", *command]).returncode != 0:
        raise RuntimeError("training the benchmark model failed")
    (run / "command.txt").write_text("splitprune " + " ".join(command) + "\n")
    return run


def agreement(run: Path, export: Path, chunk: int = 250) -> list[dict]:
    """Per budget: byte-identical uplink messages and agreeing predictions, ONNX vs PyTorch, full test set."""
    from splitprune.compression import ChannelCodec, Decoded, channel_mask, keep_channels
    from splitprune.export import kept_indices, load_workers, sample_inputs
    from splitprune.manifest import INPUT_NAME, onnx_session, read_manifest
    from splitprune.wire.codec import check_dtype_name, encode_values

    device, server, cfg, meta, _ = load_workers(str(run))
    manifest = read_manifest(export)
    dtype = check_dtype_name(manifest["codec"]["dtype_up"])
    images, labels, _ = sample_inputs(cfg, meta["in_channels"], None)
    budgets = [int(b) for b in manifest["budgets"]]
    sessions = {b: onnx_session(str(export / manifest["budgets"][str(b)]["file"]), threads=1) for b in budgets}
    stats = {b: {"budget": b, "images": 0, "identical_messages": 0, "agree": 0, "torch_correct": 0,
                 "onnx_correct": 0, "max_abs_diff": 0.0, "torch_bytes": 0, "onnx_bytes": 0} for b in budgets}

    def predict(messages) -> np.ndarray:
        decoded = [ChannelCodec.decompress(m) for m in messages]
        values = torch.cat([d.values for d in decoded])
        dense = Decoded(values, decoded[0].channels, decoded[0].num_channels).dense()
        return server.half(dense).argmax(1).numpy()

    with torch.no_grad():
        for start in range(0, len(images), chunk):
            x, y = images[start:start + chunk], labels[start:start + chunk]
            z = device.half(x)
            for b in budgets:
                channels = kept_indices(device.half, b)
                ref = keep_channels(z, channels, channel_mask(device.half.gate_logits), cfg.scaling)
                # what splitprune-device does: the ONNX file, then the numpy codec with the manifest's indices
                got = sessions[b].run(None, {INPUT_NAME: x.numpy()})[0]
                indices = manifest["budgets"][str(b)]["channels"]
                ours = [encode_values(got[i:i + 1], indices, device.channels, dtype) for i in range(len(x))]
                theirs = [device.codec.compress(ref[i:i + 1], channels, device.channels) for i in range(len(x))]
                p_onnx, p_torch = predict(ours), predict(theirs)
                s = stats[b]
                s["images"] += len(x)
                s["identical_messages"] += sum(a.SerializeToString() == t.SerializeToString()
                                               for a, t in zip(ours, theirs))
                s["agree"] += int((p_onnx == p_torch).sum())
                s["torch_correct"] += int((p_torch == y).sum())
                s["onnx_correct"] += int((p_onnx == y).sum())
                s["max_abs_diff"] = max(s["max_abs_diff"], float(np.abs(got - ref.numpy()).max()))
                s["torch_bytes"] += sum(m.ByteSize() for m in theirs)
                s["onnx_bytes"] += sum(m.ByteSize() for m in ours)
    return list(stats.values())


def latency(run: Path, export: Path, budget: int, calls: int = 300, rounds: int = 5) -> dict:
    """Device half at batch 1, 1 thread: median ms per call, interleaved rounds (noise hits all alike)."""
    from splitprune.compression import channel_mask, keep_channels
    from splitprune.export import FoldedDeviceHalf, kept_indices, load_workers, sample_inputs
    from splitprune.manifest import INPUT_NAME, onnx_file, onnx_session

    torch.set_num_threads(1)
    device, _, cfg, meta, _ = load_workers(str(run))
    x, _, _ = sample_inputs(cfg, meta["in_channels"], 1)
    channels = kept_indices(device.half, budget)
    folded = FoldedDeviceHalf(device.half, channels, cfg.scaling)
    session = onnx_session(str(export / onnx_file(budget)), threads=1)
    xn = x.numpy()
    variants = {
        "torch": lambda: keep_channels(device.half(x), channels, channel_mask(device.half.gate_logits), cfg.scaling),
        "torch_folded": lambda: folded(x),
        "onnxruntime": lambda: session.run(None, {INPUT_NAME: xn}),
    }
    samples: dict[str, list[float]] = {name: [] for name in variants}
    load_before = os.getloadavg()
    with torch.no_grad():
        for fn in variants.values():
            for _ in range(30):
                fn()
        for _ in range(rounds):
            for name, fn in variants.items():
                for _ in range(calls):
                    t0 = time.perf_counter()
                    fn()
                    samples[name].append((time.perf_counter() - t0) * 1e3)
    medians = {name: statistics.median(v) for name, v in samples.items()}
    return {"budget": budget, "batch": 1, "threads": 1, "calls": calls * rounds, "median_ms": medians,
            "p90_ms": {name: float(np.percentile(v, 90)) for name, v in samples.items()},
            "onnx_over_torch": medians["onnxruntime"] / medians["torch"],
            "load_average_before": load_before, "load_average_after": os.getloadavg()}


def disk_bytes(folder: Path) -> int:
    """Bytes on disk (allocated blocks, each inode once), as `du` counts them."""
    seen, total = set(), 0
    for root, _, files in os.walk(folder):
        for name in files:
            st = os.lstat(os.path.join(root, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def make_venv(path: Path, *requirements: str) -> dict:
    shutil.rmtree(path, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    start = time.monotonic()
    subprocess.run([str(path / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    *requirements], check=True, capture_output=True)
    has_torch = subprocess.run([str(path / "bin" / "python"), "-c", "import torch"], capture_output=True).returncode == 0
    return {"path": str(path), "install": " ".join(requirements), "install_seconds": time.monotonic() - start,
            "disk_bytes": disk_bytes(path), "has_torch": has_torch}


def footprint(run: Path, export: Path, images: int = 1000) -> dict:
    """Both virtualenvs for real, and the device package's end-to-end run against `splitprune serve`."""
    from splitprune.bench.core.processes import ServeSubprocess, free_port

    wheels = VENV_ROOT / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(wheels), str(REPO / "device")], check=True, capture_output=True)
    device_venv = make_venv(VENV_ROOT / "device", *map(str, wheels.glob("*.whl")))
    torch_venv = make_venv(VENV_ROOT / "torch", "torch==2.13.0", str(REPO))
    server = ServeSubprocess(free_port(), "--model", str(run)).start()
    try:
        report = VENV_ROOT / "e2e.json"
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        command = ["splitprune-device", "infer", "--server", server.address, "--model", str(export.resolve()),
                   "--labels", str(FASHION / "t10k-labels-idx1-ubyte.gz"), "--limit", str(images), "--out",
                   str(report), str(FASHION / "t10k-images-idx3-ubyte.gz")]
        done = subprocess.run([str(VENV_ROOT / "device" / "bin" / command[0]), *command[1:]], capture_output=True,
                              text=True, env=env, cwd=VENV_ROOT)
        if done.returncode:
            raise RuntimeError(f"splitprune-device infer failed: {done.stderr.strip()}")
        e2e = json.loads(report.read_text())
    finally:
        server.stop()
    e2e.pop("predictions")
    e2e.pop("ms")
    return {"device_venv": device_venv, "torch_venv": torch_venv,
            "size_ratio": device_venv["disk_bytes"] / torch_venv["disk_bytes"],
            "end_to_end": {"command": " ".join(command), **e2e}}


def run(profile: str | Profile, out: Path) -> dict:
    from splitprune.export import export_checkpoint

    torch.set_num_threads(1)  # the machine is shared; the latency figures are 1-thread figures anyway
    out.mkdir(parents=True, exist_ok=True)
    model = train_model(out)
    export = out / "export"
    export_checkpoint(str(model), str(export), BUDGETS)
    results = {"profile": profile_name(profile), "model_run": str(model), "export": str(export),
               "commands": [(model / "command.txt").read_text().strip(),
                            f"splitprune export --checkpoint {model} --out {export} --budget "
                            + ",".join(map(str, BUDGETS))]}
    for name, measure in [("agreement", agreement), ("latency", lambda m, e: latency(m, e, max(BUDGETS))),
                          ("footprint", footprint)]:
        results[name] = measure(model, export)
        write_results(out, "device", results)  # what is measured so far survives a later failure
    table = report(results)
    (out / "device.md").write_text(table)
    print(table)
    return {"table": table}


def report(r: dict) -> str:
    rows = [[a["budget"], a["images"], f"{a['agree']}/{a['images']}", f"{a['identical_messages']}/{a['images']}",
             f"{a['max_abs_diff']:.2g}", f"{100 * a['torch_correct'] / a['images']:.2f}%",
             f"{100 * a['onnx_correct'] / a['images']:.2f}%", f"{a['onnx_bytes'] / a['images']:.1f}"]
            for a in r["agreement"]]
    text = markdown_table(["budget", "test images", "same prediction", "byte-identical uplink message",
                           "max abs diff", "accuracy (torch)", "accuracy (onnx)", "B/message"], rows)
    lat, f = r["latency"], r["footprint"]
    m = lat["median_ms"]
    text += "\n" + markdown_table(
        ["device half, batch 1, 1 thread", "median ms", "p90 ms"],
        [[name, f"{m[name]:.3f}", f"{lat['p90_ms'][name]:.3f}"] for name in m])
    text += (f"\nonnxruntime / PyTorch latency ratio: **{lat['onnx_over_torch']:.3f}** (budget {lat['budget']}, "
             f"{lat['calls']} calls each; load average {lat['load_average_before'][0]:.2f} before, "
             f"{lat['load_average_after'][0]:.2f} after)\n")
    e = f["end_to_end"]
    mib = 1024 * 1024
    text += "\n" + markdown_table(["virtualenv", "on disk", "torch importable"], [
        ["splitprune-device only", f"{f['device_venv']['disk_bytes'] / mib:.0f} MiB", f["device_venv"]["has_torch"]],
        ["splitprune (torch==2.13.0 CPU)", f"{f['torch_venv']['disk_bytes'] / mib:.0f} MiB",
         f["torch_venv"]["has_torch"]]])
    text += f"\nsize ratio device / torch: **{f['size_ratio']:.3f}**\n"
    lm = e["latency_ms"]
    text += (f"\nend to end from the device venv against `splitprune serve` on loopback: {e['images']} test images, "
             f"accuracy {100 * e['accuracy']:.2f}%, {e['payload_bytes_up_per_image']:.1f} B/image uplink payload; "
             "per request p50 ms: " + ", ".join(f"{k} {v['p50']:.2f}" for k, v in lm.items()) + "\n")
    return text


def rerun_latency(out: Path) -> None:
    """Measure the latency again (e.g. on a quieter machine) into the suite's existing results."""
    path = out / "device.json"
    results = json.loads(path.read_text())
    results["latency"] = latency(Path(results["model_run"]), Path(results["export"]), max(BUDGETS))
    results["latency_command"] = f"python -m splitprune.bench.systems.device --latency {out}"
    path.write_text(json.dumps(results, indent=2))
    table = report(results)
    (out / "device.md").write_text(table)
    print(table)


if __name__ == "__main__":  # python -m splitprune.bench.systems.device --latency bench_results/device
    if sys.argv[1:2] != ["--latency"] or len(sys.argv) != 3:
        sys.exit("usage: python -m splitprune.bench.systems.device --latency OUT (the suite itself: splitprune bench device)")
    torch.set_num_threads(1)
    rerun_latency(Path(sys.argv[2]))
