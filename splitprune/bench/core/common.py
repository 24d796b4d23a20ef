"""Shared plumbing for benchmark suites: result files, the command that made them, machine facts."""
from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch


def machine() -> dict:
    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def command_line() -> str:
    argv = sys.argv[:]
    if argv and argv[0].endswith(("splitprune", "splitprune/__main__.py")):  # the console script or python -m
        argv[0] = "splitprune"
    return " ".join(shlex.quote(a) for a in argv)


def write_results(out: Path, name: str, results: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    payload = {"suite": name, "command": command_line(), "machine": machine(),
               "date": time.strftime("%Y-%m-%d %H:%M:%S"), **results}
    path.write_text(json.dumps(payload, indent=2))
    return path


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
