"""Byte reports of a client's traffic, by purpose: `training` (TrainRequest / TrainReply), `evaluation`
(EvalRequest / EvalReply, and Infer), `state` (PushState / FetchState: the server half's weights travelling),
`control` (Hello / Welcome, PhaseRequest / PhaseReply, CheckpointRequest / CheckpointReply, Describe, and on the
socket everything no message accounts for). Reports are plain dicts of counts, so that the reports of the
successive processes of one run add up (`add_counts`). Torch-free."""
from __future__ import annotations

PURPOSES = ("training", "evaluation", "state", "control")


BY_MESSAGES = ("encoded message bytes (gRPC messages as serialized; HTTP/2, gRPC and TLS framing and "
               "connection setup not included)")


BY_SOCKET = ("bytes on the client's TCP sockets, counted by an in-process relay (--measure-socket): HTTP/2 "
             "and gRPC framing, headers, pings and TLS records included; TCP/IP headers not")


def describe(report: dict) -> dict:
    """Say how a report's bytes were counted: `socket` (every process measured), `messages` or `mixed`."""
    measured, processes = report.get("socket_processes", 0), report.get("processes", 1)
    counted = "socket" if measured == processes else "messages" if measured == 0 else "mixed"
    method = {"socket": BY_SOCKET, "messages": BY_MESSAGES}.get(
        counted, f"{BY_MESSAGES}; socket bytes only for {measured} of the run's {processes} processes")
    return {**report, "counted": counted, "method": method}


def totals(report: dict) -> tuple[int, int]:
    """(bytes up, bytes down) of a report, all purposes: socket bytes where measured, else message bytes."""
    key = "socket_bytes" if report.get("counted") == "socket" else "message_bytes"
    purposes = report.get("purposes", {})
    return (sum(p.get(f"{key}_up", 0) for p in purposes.values()),
            sum(p.get(f"{key}_down", 0) for p in purposes.values()))


def add_counts(before: dict | None, now: dict | None) -> dict | None:
    """`now` with every number of `before` added (reports of successive processes of one run)."""
    if before is None or now is None:
        return now if before is None else before
    out = dict(before)
    for key, value in now.items():
        old = before.get(key)
        if isinstance(value, dict):
            out[key] = add_counts(old if isinstance(old, dict) else None, value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and isinstance(old, (int, float)) \
                and not isinstance(old, bool):
            out[key] = old + value
        else:
            out[key] = value
    return describe(out) if "processes" in out else out
