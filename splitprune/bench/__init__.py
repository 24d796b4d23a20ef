"""Benchmarks, by family: core (the runs behind the suites, their reports, the one verdict rule), paper (the
seed paper's claims), adaptive (one model for every budget, and the budget that follows the link), systems
(the runtime: steps, transport, the device package, fuzzing, soak, scale)."""
