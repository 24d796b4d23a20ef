"""How many channels each request carries: a fixed exported budget, or `--budget auto`, where the budget
controller of splitprune.adaptive (shipped with this package) picks (budget, uplink dtype) per request."""
from __future__ import annotations

from typing import Protocol

import numpy as np

from splitprune.adaptive import Option
from splitprune.adaptive.budgets import model_options
from splitprune.errors import UserError
from splitprune.proto import pb
from splitprune.wire.stream import exchange_sizes
from splitprune_device.model import DeviceModel


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
    try:
        budget = int(text)
    except ValueError:
        raise UserError(f"--budget must be an integer or 'auto', got {text!r}") from None
    if budget not in exported:
        raise UserError(f"budget {budget} was not exported; exported: {', '.join(map(str, exported))} "
                        "(export it with `splitprune export --budget`)")
    return FixedBudget(budget)


def auto_options(model: DeviceModel, dtypes: list[str], stream: bool) -> list[Option]:
    """The option ladder of `--budget auto`: the exported budgets x `dtypes`, each sized as one image's request and
    answer would be (encoded by this package's own uplink path; an item on a session with `stream`, else an
    Infer call)."""
    _, height, width = model.manifest["wire_shape"]
    rng = np.random.default_rng(0)

    def bytes_for(budget: int, dtype: str) -> tuple[int, int]:
        kept = rng.standard_normal((1, budget, height, width)).astype(np.float32)
        req = pb.EvalRequest(request_id=1, activations=model.encode(kept, budget, dtype))
        return exchange_sizes(model.fingerprint, budget, req, stream)

    return model_options(model.manifest, dtypes, bytes_for)
