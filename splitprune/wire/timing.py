"""The server's time in a reply (TrainReply.server_us, InferReply.server_ms, InferItemReply.server_us): written
by the server, checked by the device before it subtracts it from the round trip to tell link time from
server time. A value that cannot be true is a protocol error: used as it is, it would make the link look
faster (or slower) than it is."""
from __future__ import annotations

import math

from splitprune.errors import ProtocolError

MAX_SERVER_SECONDS = 600.0    # no one message takes a server ten minutes
MAX_US = 2**32 - 1            # what a uint32 field of microseconds holds
# The server's clock is read inside the device's round trip; what it may show beyond it is the coarseness
# of either clock and the rate difference of two machines' clocks (NTP slews by up to 500 ppm).
SLACK_S, SLACK_RATE = 0.001, 1e-3


def server_seconds(seconds: float, round_trip_s: float, what: str) -> float:
    """`seconds`, the server's time as a reply reports it (converted from its field's unit), once checked: a
    finite number >= 0, at most MAX_SERVER_SECONDS, and at most `round_trip_s`, the time the device measured
    from sending the request to receiving this reply (plus the clocks' slack). ProtocolError otherwise,
    naming `what` (the reply)."""
    if not (isinstance(seconds, (int, float)) and math.isfinite(seconds) and seconds >= 0):
        raise ProtocolError(f"bad server time in the {what}: {seconds!r} s is not a finite number >= 0")
    if seconds > MAX_SERVER_SECONDS:
        raise ProtocolError(f"bad server time in the {what}: {seconds:g} s is over the limit of "
                            f"{MAX_SERVER_SECONDS:g} s")
    if seconds > round_trip_s * (1 + SLACK_RATE) + SLACK_S:
        raise ProtocolError(f"bad server time in the {what}: {seconds * 1e3:.3f} ms, longer than the "
                            f"{round_trip_s * 1e3:.3f} ms the device waited for it")
    return float(seconds)


def microseconds(seconds: float) -> int:
    """The server side: a duration as a server_us field holds it (whole microseconds, capped at MAX_US)."""
    return min(max(int(seconds * 1e6), 0), MAX_US)
