"""constriction's range coder against CompressAI's rANS on our message sizes (issue 24: "measure both").

The symbols are a trained model's real ones (dtype ec's grid, the validation images through the device half
at its trained budget), coded under the model's frozen tables, once as one batch of 256 and once per single
sample. CompressAI is not a dependency (its wheel pulls another torch): its rANS extension is standalone C++,
so this script loads it from the unpacked wheel:

    pip download compressai==1.2.8 --no-deps -d /tmp/cai && (cd /tmp/cai && unzip -oq compressai-*.whl)
    python scripts/coder_compare.py --checkpoint bench_results/entropy/runs/ca4_r2_seed0/checkpoint \\
        --compressai /tmp/cai/compressai --out bench_results/entropy/coders.json
"""
from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import torch


def _extension(folder: Path, name: str):
    path = next(folder.glob(f"{name}.cpython-*.so"))
    loader = importlib.machinery.ExtensionFileLoader(name, str(path))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader))
    loader.exec_module(module)
    return module


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--compressai", required=True, help="the compressai folder of the unpacked wheel")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    from splitprune.bench.paper.entropy import _loader
    from splitprune.bench.paper.measure import load_model
    from splitprune.wire.entropy import EC_LEVELS, encode_symbols, quantize_ec

    torch.set_num_threads(1)
    ans, cxx = _extension(Path(args.compressai), "ans"), _extension(Path(args.compressai), "_CXX")
    model = load_model(args.checkpoint)
    tables = model.server.spec.tables
    channels = model.device.kept_channels(model.budget)
    rows = np.arange(tables.shape[0]) if channels is None else channels.numpy()
    x, _ = next(iter(_loader(model.cfg, "validation")))
    kept = model.device.cut_values(x)[:, torch.as_tensor(rows)].numpy()
    q = quantize_ec(kept, EC_LEVELS)                                   # [256, K, H, W]
    # CompressAI's tables: 16-bit quantised CDFs with an overflow bin (its rANS codes out-of-range symbols)
    cdfs = [cxx.pmf_to_quantized_cdf((tables[r] / tables[r].sum()).tolist() + [1e-9], 16) for r in rows]
    lengths, offsets = [len(c) for c in cdfs], [0] * len(rows)

    def rans(batch: np.ndarray) -> bytes:
        idx = np.broadcast_to(np.arange(len(rows)).reshape(1, -1, 1, 1), batch.shape)
        return ans.RansEncoder().encode_with_indexes(batch.reshape(-1).tolist(), idx.reshape(-1).tolist(), cdfs,
                                                     lengths, offsets)

    def check_rans(batch: np.ndarray, data: bytes) -> bool:
        idx = np.broadcast_to(np.arange(len(rows)).reshape(1, -1, 1, 1), batch.shape).reshape(-1).tolist()
        return ans.RansDecoder().decode_with_indexes(data, idx, cdfs, lengths, offsets) == batch.reshape(-1).tolist()

    coders = {"constriction": lambda b: encode_symbols(b, tables, rows), "compressai": rans}
    result = {"command": "python scripts/coder_compare.py " + " ".join(f"--{k.replace('_', '-')} {v}"
                                                                      for k, v in vars(args).items()),
              "checkpoint": args.checkpoint, "symbols_per_sample": int(q[0].size), "channels": len(rows)}
    entropy = 0.0
    for j, r in enumerate(rows):
        counts = np.bincount(q[:, j].reshape(-1), minlength=EC_LEVELS + 1)
        model_p = tables[r] / tables[r].sum()
        entropy += float(-(counts * np.log2(model_p)).sum())
    result["ideal_bytes_per_sample_under_the_tables"] = round(entropy / 8 / len(q), 3)
    for name, code in coders.items():
        start = time.perf_counter()
        batch = code(q)
        batch_ms = 1e3 * (time.perf_counter() - start)
        singles = [code(q[i:i + 1]) for i in range(len(q))]
        start = time.perf_counter()
        for i in range(len(q)):
            code(q[i:i + 1])
        single_ms = 1e3 * (time.perf_counter() - start) / len(q)
        result[name] = {"batch_256_bytes_per_sample": round(len(batch) / len(q), 3),
                        "single_sample_bytes": {"min": min(map(len, singles)), "median": int(np.median(
                            [len(s) for s in singles])), "max": max(map(len, singles))},
                        "encode_batch_ms": round(batch_ms, 2), "encode_single_ms": round(single_ms, 3)}
    result["compressai"]["round_trip_ok"] = check_rans(q, rans(q))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
