"""Which budgets a trained model can serve, and the ladder of them the runtime chooses from (torch-free).

The one place that says which budgets a model offers: `model_budgets(meta)` reads a checkpoint's meta
(`splitprune train`) or an export manifest (`splitprune export`). Everything that chooses a budget at run
time (`infer --budget auto`, `train --budget auto`, `splitprune-device infer --budget auto`) asks it.
"""
from __future__ import annotations

from typing import Callable

from splitprune.adaptive.controller import PRECISION_BITS, Option, option_ladder
from splitprune.errors import UserError


def model_budgets(meta: dict) -> list[int]:
    """The budgets a model serves, ascending.

    An export manifest: the budgets exported (one device graph each). A checkpoint of a gated method
    (sl, ca, deprune, prune): every B from 1 to its trained budget (top-B channels by gate); of an any-budget
    model (trained at all C channels): every B from 1 to C (the first B channels).
    """
    exported = meta.get("budgets")
    if isinstance(exported, dict):
        budgets = sorted(int(b) for b in exported)
    else:
        try:
            trained = int(meta["budget"])
        except (KeyError, TypeError, ValueError):
            raise UserError("the model does not say which budget it was trained for (no 'budget' in its meta)") from None
        budgets = list(range(1, trained + 1))
    if not budgets or budgets[0] < 1:
        raise UserError(f"the model offers no usable budget ({budgets})")
    return budgets


def ladder(budgets: list[int], limit: int | None = None) -> list[int]:
    """The budgets the controller steps through: powers of two, the smallest and the largest (up to `limit`).

    One step up doubles the bytes at most, so the controller climbs a 512-channel range in ten steps
    instead of 512."""
    usable = sorted(b for b in set(budgets) if limit is None or b <= limit)
    if not usable:
        raise UserError(f"no budget of {sorted(budgets)} is within {limit}")
    return sorted({b for b in usable if b & (b - 1) == 0} | {usable[0], usable[-1]})


def budget_quality(meta: dict, budgets: list[int]) -> Callable[[Option], tuple] | None:
    """How `--budget auto` ranks a model's options: by its validation accuracy at the option's budget, then
    precision (an any-budget run measures it on its held-out images after training: `budget_validation` in
    its meta, copied into its export manifest). None (rank by size) when the model has no such table or it
    lacks one of `budgets`; a table that is there but is not one of accuracies per budget is refused: a
    damaged model file, not a model to rank by size behind the user's back."""
    table = meta.get("budget_validation")
    if table is None:
        return None
    accuracy = table.get("accuracy") if isinstance(table, dict) else None
    try:
        measured = {int(b): float(a) for b, a in accuracy.items()}
    except (AttributeError, TypeError, ValueError):
        measured = None
    if not measured or not all(0.0 <= a <= 1.0 for a in measured.values()):
        raise UserError("the model's budget_validation table is damaged (it must map budgets to accuracies "
                        f"between 0 and 1): {str(table)[:120]}")
    if any(b not in measured for b in budgets):
        return None
    return lambda o: (measured[o.budget], PRECISION_BITS.get(o.dtype, 0))


# options within this much validation accuracy of the best cheaper one stay on the ladder: about one standard
# error of an accuracy difference on 2,000 validation images, and what keeps the ladder free of large byte gaps
RANK_TOLERANCE = 0.005


def model_options(meta: dict, dtypes: list[str], bytes_for: Callable[[int, str], tuple[int, int]],
                  ranked: bool = True) -> list[Option]:
    """The options `--budget auto` chooses from: the ladder of the model's budgets x `dtypes`, least preferred
    first (option_ladder), ranked by validation accuracy when the model measured it (budget_quality, options
    within RANK_TOLERANCE of the best cheaper one kept);
    `ranked=False`: by size whatever the model measured."""
    budgets = ladder(model_budgets(meta))
    return option_ladder(budgets, dtypes, bytes_for, budget_quality(meta, budgets) if ranked else None,
                         RANK_TOLERANCE)


def uplink_dtypes(text: str | None, trained: str) -> list[str]:
    """The uplink dtypes to choose from: `--dtypes-up a,b` or, by default, the trained one and the cheaper
    ones down to int8 (int4 only when trained with it: it costs accuracy)."""
    if text is None:
        trained = trained if trained in PRECISION_BITS else "int4"  # ec: the int4 grid, entropy-coded
        floor = min(PRECISION_BITS[trained], PRECISION_BITS["int8"])
        return [d for d in PRECISION_BITS if floor <= PRECISION_BITS[d] <= PRECISION_BITS[trained]]
    names = [d.strip() for d in text.split(",") if d.strip()]
    bad = [d for d in names if d not in PRECISION_BITS]  # ec's size depends on the data: not on a ladder
    if not names or bad:
        raise UserError(f"--dtypes-up takes a comma-separated list of {', '.join(PRECISION_BITS)}, got {text!r}")
    return list(dict.fromkeys(names))
