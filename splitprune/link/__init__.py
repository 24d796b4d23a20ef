"""Link emulation in user space: a TCP proxy with a rate limit, delay and jitter (proxy), and rate/delay
schedules over time (trace, with the shipped traces under traces/). `splitprune link` runs it."""
