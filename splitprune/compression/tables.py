"""Frozen entropy tables of a trained model (dtype EC, splitprune/wire/entropy.py): counted on the training set
at the end of training for each grid (L = 3, 7, 15: dtypes ec3, ec7, ec), per channel or per channel and
position (--ec-prior), kept in the checkpoint's sealed
metadata and, for the exported dtype, in the manifest."""
from __future__ import annotations

from typing import Iterable

import numpy as np
import torch

from splitprune.errors import UserError
from splitprune.wire.entropy import EC_DTYPES, check_tables, fit_tables, levels_of, quantize_ec, tables_digest

META_KEY = "ec_tables"
LEVELS = tuple(sorted(EC_DTYPES.values()))


def count_symbols(values: Iterable[torch.Tensor], channels: int, levels: tuple[int, ...] = LEVELS,
                  positions: int = 1) -> dict[int, np.ndarray]:
    """Symbol counts per grid L of the values every channel would send ([N, C, H, W] in [0, 1]): [C, L+1], or
    with positions H*W (a position prior) [C, H*W, L+1]."""
    counts = {L: np.zeros(channels * positions * (L + 1), dtype=np.int64) for L in levels}
    for batch in values:
        array = batch.detach().cpu().numpy()
        _, _, h, w = array.shape
        if positions not in (1, h * w):
            raise ValueError(f"{positions} positions of tables for a {h}x{w} cut")
        rows = np.arange(channels * positions).reshape(1, channels, *((h, w) if positions > 1 else (1, 1)))
        for L, total in counts.items():
            total += np.bincount((quantize_ec(array, L) + rows * (L + 1)).reshape(-1), minlength=total.size)
    shape = (channels, positions) if positions > 1 else (channels,)
    return {L: c.reshape(*shape, L + 1) for L, c in counts.items()}


def table_entry(tables: np.ndarray) -> dict:
    """One grid's tables as the metadata keeps them (JSON: integers only)."""
    return {"levels": levels_of(tables), "digest": tables_digest(tables), "tables": tables.tolist()}


def tables_entries(counts: dict[int, np.ndarray]) -> list[dict]:
    return [table_entry(fit_tables(c)) for _, c in sorted(counts.items())]


def check_entry(entry: dict, channels: int) -> np.ndarray:
    try:
        tables = check_tables(np.asarray(entry["tables"], dtype=np.int64), channels)
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"entropy tables are invalid: {exc}") from None
    if levels_of(tables) != entry.get("levels") or tables_digest(tables) != entry.get("digest"):
        raise UserError("entropy tables do not match their digest or level count")
    return tables


def read_tables(meta: dict, channels: int) -> dict[int, np.ndarray] | None:
    """The frozen tables of a checkpoint's metadata by grid L, checked; None when it has none."""
    entries = meta.get(META_KEY)
    if entries is None:
        return None
    entries = [entries] if isinstance(entries, dict) else entries  # one grid (L = 15) in earlier checkpoints
    tables = {}
    for entry in entries:
        t = check_entry(entry, channels)
        tables[levels_of(t)] = t
    return tables
