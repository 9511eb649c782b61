"""Flat dicts of numpy arrays <-> Flower ArrayRecords (the wire form of statistics uploads)."""
from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord

__all__ = ["arrays_to_record", "record_to_arrays"]


def arrays_to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def record_to_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: record[k].numpy() for k in record.keys()}
