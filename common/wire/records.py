"""Flower records <-> numpy arrays: the wire form of weights and statistics, decoded as untrusted input.

Flower's own ``Array.numpy()`` hands the payload to ``np.load``, which allocates whatever element count the
npy header claims (a 20-byte header can ask for terabytes) and trusts that the header agrees with the
Array's declared ``dtype``/``shape``. :func:`decode_array` instead parses the header itself and checks,
*before* any allocation:

* the serialization type is ``numpy.ndarray`` (npy bytes; nothing is ever unpickled);
* the npy header is well formed (magic, version 1-3, a bounded literal dict with exactly ``descr``,
  ``fortran_order``, ``shape``);
* the dtype is a plain number (bool, signed/unsigned integer or float; no objects, strings, records);
* header dtype and shape equal the Array's declared ``dtype`` and ``shape`` (and the expected shape, when
  the caller knows it);
* the payload holds exactly ``prod(shape) * itemsize`` bytes after the header.

The array is then a zero-copy, read-only view of the bytes already received (their size is bounded by
the server's upload cap), converted to native byte order when needed. Every failure is a
:class:`WireError` (a ``ValueError``) naming the array and the check.
"""
from __future__ import annotations

import ast
import hashlib
import math
from typing import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

__all__ = ["WireError", "arrays_to_record", "record_to_arrays", "decode_array", "weights_digest",
           "tensor_digest"]

NPY_MAGIC = b"\x93NUMPY"
NUMERIC_KINDS = "biuf"
MAX_HEADER_BYTES = 4096      # numpy writes ~118 bytes; anything longer is not an honest header
MAX_DIMS = 32                # numpy's own limit on array dimensions


class WireError(ValueError):
    """An array or record on the wire failed a check; the message names the array and the check."""


def arrays_to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def record_to_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Every array of a record, decoded with :func:`decode_array` (read-only views)."""
    return {k: decode_array(record[k], k) for k in record.keys()}


def _npy_header(data: bytes, name: str) -> tuple[np.dtype, bool, tuple[int, ...], int]:
    """(dtype, fortran_order, shape, offset of the payload) of an npy buffer, without reading the payload."""
    if len(data) < 10 or data[:6] != NPY_MAGIC:
        raise WireError(f"array '{name}': payload is not an npy buffer (bad magic bytes)")
    major = data[6]
    if major == 1:
        hlen, start = int.from_bytes(data[8:10], "little"), 10
    elif major in (2, 3):
        if len(data) < 12:
            raise WireError(f"array '{name}': truncated npy header")
        hlen, start = int.from_bytes(data[8:12], "little"), 12
    else:
        raise WireError(f"array '{name}': unknown npy format version {major}")
    if hlen > MAX_HEADER_BYTES or start + hlen > len(data):
        raise WireError(f"array '{name}': npy header of {hlen} bytes is too long or truncated")
    try:
        text = data[start:start + hlen].decode("utf-8" if major == 3 else "latin1")
        header = ast.literal_eval(text)
    except (UnicodeDecodeError, ValueError, SyntaxError, MemoryError, RecursionError):
        raise WireError(f"array '{name}': unreadable npy header") from None
    if not isinstance(header, dict) or set(header) != {"descr", "fortran_order", "shape"}:
        raise WireError(f"array '{name}': npy header must have exactly descr, fortran_order and shape")
    descr, fortran, shape = header["descr"], header["fortran_order"], header["shape"]
    if not isinstance(descr, str):
        raise WireError(f"array '{name}': structured dtype {descr!r} (a plain numeric dtype is required)")
    try:
        dtype = np.dtype(descr)
    except (TypeError, ValueError):
        raise WireError(f"array '{name}': unknown dtype {descr!r}") from None
    if dtype.hasobject or dtype.kind not in NUMERIC_KINDS or dtype.subdtype is not None:
        raise WireError(f"array '{name}': dtype {dtype} is not numeric (bool, integer or float required)")
    if not isinstance(fortran, bool):
        raise WireError(f"array '{name}': fortran_order must be True or False")
    if (not isinstance(shape, tuple) or len(shape) > MAX_DIMS
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)):
        raise WireError(f"array '{name}': shape {shape!r} is not a tuple of at most {MAX_DIMS} sizes >= 0")
    return dtype, fortran, shape, start + hlen


def decode_array(arr: Array, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """One Array from a client -> a read-only numpy view, checked before allocation (see module docstring)."""
    if not isinstance(arr, Array):
        raise WireError(f"array '{name}': not a Flower Array ({type(arr).__name__})")
    if arr.stype != "numpy.ndarray":
        raise WireError(f"array '{name}': unsupported serialization type {str(arr.stype)[:40]!r} "
                        "(only numpy.ndarray)")
    data = arr.data
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError(f"array '{name}': payload is not bytes")
    data = bytes(data) if not isinstance(data, bytes) else data
    dtype, fortran, hshape, offset = _npy_header(data, name)
    try:
        declared_shape = tuple(int(s) for s in arr.shape)
        declared_dtype = np.dtype(arr.dtype)
    except (TypeError, ValueError):
        raise WireError(f"array '{name}': unreadable declared dtype/shape") from None
    if declared_shape != hshape:
        raise WireError(f"array '{name}': declared shape {declared_shape} but the payload holds {hshape}")
    if declared_dtype != dtype:
        raise WireError(f"array '{name}': declared dtype {declared_dtype} but the payload holds {dtype}")
    if shape is not None and hshape != tuple(shape):
        raise WireError(f"array '{name}': shape {hshape}, expected {tuple(shape)}")
    count = math.prod(hshape)
    if count * dtype.itemsize != len(data) - offset:
        raise WireError(f"array '{name}': header claims {count} elements of {dtype.itemsize} bytes "
                        f"but the payload has {len(data) - offset} bytes")
    a = np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(hshape, order="F" if fortran else "C")
    if not dtype.isnative and dtype.itemsize > 1:
        a = a.astype(dtype.newbyteorder("="))
        a.flags.writeable = False
    return a


def tensor_digest(t: torch.Tensor | np.ndarray) -> bytes:
    a = t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
    a = np.ascontiguousarray(a)
    a = a.astype(a.dtype.newbyteorder("<")) if a.dtype.byteorder == ">" else a
    return f"{a.dtype.str}{a.shape}".encode() + a.tobytes()


def weights_digest(state: Mapping[str, torch.Tensor | np.ndarray]) -> str:
    """SHA-256 of a set of named arrays (names, dtypes, shapes, little-endian bytes; order-independent):
    what a client echoes to show which reference weights or which probe it computed its statistics on."""
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode() + b"\0")
        h.update(tensor_digest(state[k]))
    return h.hexdigest()
