"""How many channels each request carries. A policy is asked before every request and told how it went,
so a latency-driven controller (`--budget auto`, once the any-budget work lands) plugs in here."""
from __future__ import annotations

from typing import Protocol

from splitprune.errors import UserError


class BudgetPolicy(Protocol):
    def budget(self) -> int: ...

    def observe(self, total_ms: float, bytes_up: int) -> None: ...


class FixedBudget:
    def __init__(self, budget: int) -> None:
        self.value = budget

    def budget(self) -> int:
        return self.value

    def observe(self, total_ms: float, bytes_up: int) -> None:
        pass


def make_policy(text: str | None, exported: list[int], trained: int) -> BudgetPolicy:
    """--budget B (one of the exported budgets; default: the trained budget if exported, else the largest)."""
    if text is None:
        return FixedBudget(trained if trained in exported else max(exported))
    if text == "auto":
        raise UserError("--budget auto needs the any-budget controller, which this version does not have yet; "
                        f"give one of the exported budgets: {', '.join(map(str, exported))}")
    try:
        budget = int(text)
    except ValueError:
        raise UserError(f"--budget must be an integer, got {text!r}") from None
    if budget not in exported:
        raise UserError(f"budget {budget} was not exported; exported: {', '.join(map(str, exported))} "
                        "(export it with `splitprune export --budget`)")
    return FixedBudget(budget)
