"""Frozen entropy tables of a trained model (dtype EC, splitprune/wire/entropy.py): counted on the training set
at the end of training, kept in the checkpoint's sealed metadata and in the exported manifest."""
from __future__ import annotations

from typing import Iterable

import numpy as np
import torch

from splitprune.errors import UserError
from splitprune.wire.entropy import EC_LEVELS, check_tables, fit_tables, quantize_ec, tables_digest

META_KEY = "ec_tables"


def count_symbols(values: Iterable[torch.Tensor], channels: int, levels: int = EC_LEVELS) -> np.ndarray:
    """Symbol counts [C, L+1] of the values every channel would send ([N, C, H, W] batches in [0, 1])."""
    counts = np.zeros(channels * (levels + 1), dtype=np.int64)
    rows = (np.arange(channels) * (levels + 1)).reshape(1, -1, 1, 1)
    for batch in values:
        q = quantize_ec(batch.detach().cpu().numpy(), levels)
        counts += np.bincount((q + rows).reshape(-1), minlength=counts.size)
    return counts.reshape(channels, levels + 1)


def tables_entry(counts: np.ndarray) -> dict:
    """What the checkpoint's metadata keeps (JSON: integers only)."""
    tables = fit_tables(counts)
    return {"levels": tables.shape[1] - 1, "digest": tables_digest(tables), "tables": tables.tolist()}


def read_tables(meta: dict, channels: int) -> np.ndarray | None:
    """The frozen tables of a checkpoint's metadata, checked; None when it has none (trained before them)."""
    entry = meta.get(META_KEY)
    if entry is None:
        return None
    try:
        tables = check_tables(np.asarray(entry["tables"], dtype=np.int64), channels)
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"the checkpoint's entropy tables are invalid: {exc}") from None
    if tables.shape[1] - 1 != EC_LEVELS or tables_digest(tables) != entry.get("digest"):
        raise UserError("the checkpoint's entropy tables do not match their digest or level count")
    return tables
