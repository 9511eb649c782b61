"""Compressed wire format for probe statistics: a transmission dtype and an optional low-rank form.

Statistics are always accumulated in float64 (:mod:`fedmerge.common.engine.stats`); only their transport is
compressed. Every block is self-describing, so the server needs no configuration to decode an upload. This is
the one statistics codec; float64 full rank is the original headerless format, which decodes unchanged.

Keys per block ``<prefix>.<group>`` (``own`` or ``cross``):

* ``.n`` (int64, 1): sample count -- always.
* ``.enc`` (int64, 4) = ``[version=1, dtype code, form, rank]``. **Absent: the legacy dense float64 block**
  (``.mean``, ``.m2`` / ``.mean_a``, ``.mean_b``, ``.c``, any float dtype, read as float64).
* dtype codes: 0 float64, 1 float32, 2 float16, 3 bfloat16 (sent as its raw bits in a uint16 array: numpy
  has no bfloat16; the bits are the upper half of the float32 pattern, rounded to nearest even, and decode
  exactly to those float32 values).
* Small vectors (means, scales, eigen-/singular values, sigma^2) travel as float32 unless the dtype is float64
  (or a value is outside float32's normal range); only the O(d^2) or O(d k) payloads use the chosen dtype.

Forms (``enc[2]``):

* 0, dense. Own ``m2``: its upper triangle only (``.m2.tri``, d(d+1)/2 values, row-major
  ``numpy.triu_indices``), lossless. Cross ``c``: whole (``.c``). float16/bfloat16 payloads are scaled first,
  so nothing overflows (float16 ends at 65504) and small units keep their relative precision: own
  ``m2 = D R D``, ``D = diag(sqrt(m2_ii))`` (``R`` the correlation matrix, entries in [-1, 1], unit diagonal: the
  variances come back exactly up to the float32 scales ``.m2.scale``); cross ``c = diag(r) Y diag(q)``, row
  maxima ``r_i = max_j |c_ij|`` then column maxima ``q_j`` of ``c / r``, so ``|Y| <= 1`` (``.c.scale`` = [r, q]).
  Scaling uses the *transmitted* (rounded) scales, so the only error is the payload's rounding:
  ``|err_ij| <= u s_i s_j`` (own), ``u r_i q_j`` (cross), unit round-off ``u`` = 2^-11 (float16) or 2^-8
  (bfloat16; the double rounding via float32 adds at most 2^-24), plus float16's subnormal floor (entries below
  2^-24 flush to zero). float32 payloads are cast unscaled: ``|err_ij| <= 2^-24 |x_ij|``.
* 1, low rank (``rank`` = k, 0 < k < d), own block, probabilistic PCA: with ``m2 = sum_i l_i v_i v_i^T``
  (l_1 >= ... >= l_d), send ``V_k`` (``.m2.vecs``, d x k), ``l_1..l_k`` (``.m2.vals``) and ``sigma^2 =
  mean(l_{k+1}, ..., l_d)`` (``.m2.sigma2``); decode ``m2_k = V_k diag(l) V_k^T + sigma^2 (I - V_k V_k^T)``:
  ``tr(m2_k) = tr(m2)`` (the scale of CCA's trace-relative ridge ``gamma tr(S)/d`` is kept), and ``m2_k`` is
  positive definite unless the dropped eigenvalues (clamped >= 0) are all zero. sigma^2 is the Frobenius-optimal
  isotropic fill and the maximum-likelihood noise variance of probabilistic PCA (Tipping & Bishop, 1999). The
  received ``V_k`` is re-orthonormalised (polar factor), so rounding never breaks these properties.
* 1, low rank, cross block: ``c ~ L diag(s) R^T`` with unit-norm columns (``.c.left`` d_a x k,
  ``.c.right`` d_b x k, ``.c.vals`` k). Two ways to choose the k directions, same wire format:

  - plain truncated SVD of ``c`` (best rank-k in Frobenius norm; dominated by high-variance units);
  - whitened (``whiten=(own_a, own_b)``, what a client with rank > 0 sends): CCA merges with the whitened
    cross-covariance ``W = A^-1/2 c B^-1/2`` (``A``, ``B`` the ridge-regularised own blocks); its SVD
    ``W = U diag(rho) V^T`` gives the canonical correlations. Keeping its top k and mapping back,
    ``c_k = A^1/2 U_k diag(rho_k) V_k^T B^1/2``, is the best rank-k approximation of ``c`` in the norm
    ``||A^-1/2 (.) B^-1/2||_F``: on the server (same own blocks and ridge) the k most correlated canonical
    pairs are kept exactly, the least correlated dropped. ``L = A^1/2 U_k``, ``R = B^1/2 V_k`` are sent
    column-normalised, their norms folded into ``s``. The ridge is ``WHITEN_GAMMA tr(S)/d`` (the default
    gamma): for another gamma the kept pairs are exact only approximately.

  The dropped directions are undetermined for CCA (the server maps them by its dead-unit prior); low rank
  is for very wide layers: measure it (``benchmarks/compression.py``). A block is sent dense when the factors
  would not be smaller (k >= d, ``d k >= d(d+1)/2`` own, ``(d_a + d_b) k >= d_a d_b`` cross).

Decoding checks header, dtypes, shapes, finite values, scales > 0, eigenvalues >= 0; ValueError names the block.
"""
from __future__ import annotations

import numpy as np
import torch

from fedmerge.common.engine.graph import MergeSpec
from fedmerge.common.engine.stats import (
    CrossMoments,
    GroupCross,
    GroupMoments,
    Moments,
    check_block,
)

__all__ = ["DTYPES", "WHITEN_GAMMA", "check_options", "encode_moments", "decode_moments", "encode_cross",
           "decode_cross", "payload_bytes", "block_encoding"]

DTYPES = ("float64", "float32", "float16", "bfloat16")
VERSION = 1
DENSE, LOWRANK = 0, 1
WHITEN_GAMMA = 0.1
_CODE = {name: i for i, name in enumerate(DTYPES)}
_WIRE = {0: np.dtype(np.float64), 1: np.dtype(np.float32), 2: np.dtype(np.float16), 3: np.dtype(np.uint16)}
_F32_MAX, _F32_TINY = float(np.finfo(np.float32).max), float(np.finfo(np.float32).tiny)


def check_options(dtype: str, rank: int) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"stats dtype must be one of {DTYPES}, got {dtype!r}")
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 0:
        raise ValueError(f"stats rank must be an integer >= 0 (0 = full rank), got {rank!r}")


# --- element codecs ---------------------------------------------------------------------------------------------
def _to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float64 -> bfloat16 bit patterns (uint16), round to nearest even via float32."""
    b = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((b + (np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)).astype(np.uint16)


def _from_bf16_bits(b: np.ndarray) -> np.ndarray:
    return (np.ascontiguousarray(b, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32).astype(
        np.float64)


def _cast(x: np.ndarray, code: int, name: str) -> np.ndarray:
    out = _to_bf16_bits(x) if code == 3 else np.ascontiguousarray(x, dtype=_WIRE[code])
    if code != 0 and not np.isfinite(_uncast(out, code)).all():
        raise ValueError(f"statistics block '{name}': values beyond the {DTYPES[code]} range "
                         f"(largest {np.abs(x).max():.3g})")
    return out


def _uncast(a: np.ndarray, code: int) -> np.ndarray:
    return _from_bf16_bits(a) if code == 3 else np.asarray(a, dtype=np.float64)


def _side(x: np.ndarray, code: int) -> np.ndarray:
    """Small vectors: float64 for float64 uploads, else float32 unless a value is outside its normal range."""
    x = np.asarray(x, dtype=np.float64)
    if code == 0:
        return x.copy()
    ax = np.abs(x)
    if ((ax == 0) | ((ax >= _F32_TINY) & (ax <= _F32_MAX))).all():
        return x.astype(np.float32)
    return x.copy()


def _scales(v: np.ndarray) -> np.ndarray:
    """Positive scales: zero (a dead unit, an all-zero row) -> 1."""
    return np.where(np.isfinite(v) & (v > 0), v, 1.0)


# --- encoding ---------------------------------------------------------------------------------------------------
def _header(code: int, form: int, rank: int) -> np.ndarray:
    return np.array([VERSION, code, form, rank], dtype=np.int64)


def _np(t) -> np.ndarray:
    return t.detach().cpu().to(torch.float64).numpy() if isinstance(t, torch.Tensor) else np.asarray(t, np.float64)


def encode_moments(own: GroupMoments, dtype: str = "float64", rank: int = 0, prefix: str = "own"
                   ) -> dict[str, np.ndarray]:
    """Own statistics -> flat dict of arrays (see the module docstring); float64 full rank: the headerless form."""
    check_options(dtype, rank)
    code = _CODE[dtype]
    out: dict[str, np.ndarray] = {}
    for g, m in own.items():
        name = f"{prefix}.{g}"
        mean, m2 = _np(m.mean), _np(m.m2)
        if not (np.isfinite(mean).all() and np.isfinite(m2).all()):
            raise ValueError(f"statistics block '{name}': non-finite values, nothing to encode")
        d = m2.shape[0]
        out[f"{name}.n"] = np.array([m.n], dtype=np.int64)
        dense_size = d * d if code == 0 else d * (d + 1) // 2
        if 0 < rank < d and d * rank < dense_size:
            m2 = (m2 + m2.T) / 2
            vals, vecs = np.linalg.eigh(m2)
            vals, vecs = vals[::-1], vecs[:, ::-1]
            sigma2 = max(float(vals[rank:].mean()), 0.0)
            out[f"{name}.enc"] = _header(code, LOWRANK, rank)
            out[f"{name}.mean"] = _side(mean, code)
            out[f"{name}.m2.vecs"] = _cast(np.ascontiguousarray(vecs[:, :rank]), code, name)
            out[f"{name}.m2.vals"] = _side(np.clip(vals[:rank], 0.0, None), code)
            out[f"{name}.m2.sigma2"] = _side(np.array([sigma2]), code)
        elif code == 0:
            out[f"{name}.mean"] = mean.copy()
            out[f"{name}.m2"] = m2.copy()
        else:
            out[f"{name}.enc"] = _header(code, DENSE, 0)
            out[f"{name}.mean"] = _side(mean, code)
            iu = np.triu_indices(d)
            if code in (2, 3):
                scale = _side(_scales(np.sqrt(np.clip(np.diagonal(m2), 0.0, None))), code)
                s = scale.astype(np.float64)
                # rows of zero variance are zero for a PSD block; round-off residue there is bounded by 1
                r = np.clip(m2 / np.outer(s, s), -1.0, 1.0)
                out[f"{name}.m2.scale"] = scale
                out[f"{name}.m2.tri"] = _cast(r[iu], code, name)
            else:
                out[f"{name}.m2.tri"] = _cast(m2[iu], code, name)
    return out


def _unit_columns(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    norms = np.linalg.norm(a, axis=0)
    norms = np.where(norms > 0, norms, 1.0)
    return a / norms, norms


def _whitened_factors(c, own_a: Moments, own_b: Moments, rank: int):
    def powers(m2):
        s = (m2 + m2.T) / 2
        d = s.shape[0]
        s = s + WHITEN_GAMMA * max(np.trace(s) / d, 1e-300) * np.eye(d)
        w, v = np.linalg.eigh(s)
        w = np.clip(w, max(w.max(), 1e-300) * 1e-12, None)
        r = np.sqrt(w)
        return (v * r) @ v.T, (v / r) @ v.T

    a_h, a_mh = powers(_np(own_a.m2))
    b_h, b_mh = powers(_np(own_b.m2))
    u, rho, vt = np.linalg.svd(a_mh @ c @ b_mh)
    left, nl = _unit_columns(a_h @ u[:, :rank])
    right, nr = _unit_columns(b_h @ vt[:rank].T)
    return left, rho[:rank] * nl * nr, right


def encode_cross(cross: GroupCross, dtype: str = "float64", rank: int = 0, prefix: str = "cross",
                 whiten: tuple[GroupMoments, GroupMoments] | None = None) -> dict[str, np.ndarray]:
    """Cross statistics -> flat dict of arrays. ``whiten=(own_a, own_b)``: the own blocks of the reference and
    of the model (on the same probe) choose the low-rank directions by canonical correlation instead of raw
    covariance (see the module docstring). float64 full rank gives the headerless form."""
    check_options(dtype, rank)
    code = _CODE[dtype]
    out: dict[str, np.ndarray] = {}
    for g, m in cross.items():
        name = f"{prefix}.{g}"
        ma, mb, c = _np(m.mean_a), _np(m.mean_b), _np(m.c)
        if not (np.isfinite(ma).all() and np.isfinite(mb).all() and np.isfinite(c).all()):
            raise ValueError(f"statistics block '{name}': non-finite values, nothing to encode")
        da, db = c.shape
        out[f"{name}.n"] = np.array([m.n], dtype=np.int64)
        if 0 < rank < min(da, db) and (da + db) * rank < da * db:
            if whiten is not None:
                left, vals, right = _whitened_factors(c, whiten[0][g], whiten[1][g], rank)
            else:
                u, s, vt = np.linalg.svd(c)
                left, vals, right = u[:, :rank], s[:rank], vt[:rank].T
            out[f"{name}.enc"] = _header(code, LOWRANK, rank)
            out[f"{name}.mean_a"], out[f"{name}.mean_b"] = _side(ma, code), _side(mb, code)
            out[f"{name}.c.left"] = _cast(np.ascontiguousarray(left), code, name)
            out[f"{name}.c.vals"] = _side(vals, code)
            out[f"{name}.c.right"] = _cast(np.ascontiguousarray(right), code, name)
        elif code == 0:
            out[f"{name}.mean_a"], out[f"{name}.mean_b"], out[f"{name}.c"] = ma.copy(), mb.copy(), c.copy()
        else:
            out[f"{name}.enc"] = _header(code, DENSE, 0)
            out[f"{name}.mean_a"], out[f"{name}.mean_b"] = _side(ma, code), _side(mb, code)
            if code in (2, 3):
                r = _side(_scales(np.abs(c).max(1)), code).astype(np.float64)
                q = _side(_scales((np.abs(c) / r[:, None]).max(0)), code).astype(np.float64)
                out[f"{name}.c.scale"] = _side(np.concatenate([r, q]), code)
                out[f"{name}.c"] = _cast(np.clip(c / np.outer(r, q), -1.0, 1.0), code, name)
            else:
                out[f"{name}.c"] = _cast(c, code, name)
    return out


# --- decoding ---------------------------------------------------------------------------------------------------
class _Block:
    """Typed access to one block's arrays with errors that name it."""

    def __init__(self, arrays: dict, name: str):
        self.arrays, self.name = arrays, name

    def fail(self, what: str):
        raise ValueError(f"statistics block '{self.name}': {what}")

    def raw(self, field: str) -> np.ndarray:
        key = f"{self.name}.{field}"
        if key not in self.arrays:
            self.fail(f"missing array '{key}'")
        return np.asarray(self.arrays[key])

    def count(self) -> int:
        a = self.raw("n")
        if a.dtype.kind not in "iu" or a.size != 1:
            self.fail(f"sample count must be one integer, got dtype {a.dtype} size {a.size}")
        return int(a.reshape(-1)[0])

    def header(self) -> tuple[int, int, int] | None:
        key = f"{self.name}.enc"
        if key not in self.arrays:
            return None
        h = np.asarray(self.arrays[key])
        if h.dtype.kind not in "iu" or h.shape != (4,):
            self.fail(f"encoding header must be 4 integers, got dtype {h.dtype} shape {h.shape}")
        version, code, form, rank = (int(v) for v in h)
        if version != VERSION:
            self.fail(f"unknown encoding version {version} (this server reads version {VERSION})")
        if code not in _WIRE:
            self.fail(f"unknown dtype code {code} (known: {dict(enumerate(DTYPES))})")
        if form not in (DENSE, LOWRANK):
            self.fail(f"unknown encoding form {form} (0 dense, 1 low rank)")
        if form == DENSE and rank != 0:
            self.fail(f"dense block with rank {rank}")
        return code, form, rank

    def payload(self, field: str, code: int, shape: tuple) -> np.ndarray:
        a = self.raw(field)
        if a.dtype != _WIRE[code]:
            self.fail(f"'{field}' has dtype {a.dtype}, expected {_WIRE[code]} for {DTYPES[code]}")
        return self._checked(field, _uncast(a, code), shape)

    def side(self, field: str, shape: tuple, itemsize: int = 4, expected: str = "float32 or float64") -> np.ndarray:
        a = self.raw(field)
        if a.dtype.kind != "f" or a.dtype.itemsize < itemsize:
            self.fail(f"'{field}' has dtype {a.dtype}, expected {expected}")
        return self._checked(field, a.astype(np.float64), shape)

    def dense(self, field: str, shape: tuple) -> np.ndarray:  # a headerless block: any float dtype
        return self.side(field, shape, 1, "a float array")

    def _checked(self, field, a, shape):
        if a.shape != tuple(shape):
            self.fail(f"'{field}' has shape {a.shape}, expected {tuple(shape)}")
        if not np.isfinite(a).all():
            self.fail(f"'{field}' has non-finite values")
        return a

    def positive(self, field, a):
        if not (a > 0).all():
            self.fail(f"'{field}' has non-positive scales")
        return a

    def rank(self, rank: int, d: int) -> int:
        if not 0 < rank < d:
            self.fail(f"rank {rank} outside [1, {d - 1}] for a low-rank block of dimension {d}")
        return rank


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))


def _orthonormal(v: np.ndarray) -> np.ndarray:
    u, _, wt = np.linalg.svd(v, full_matrices=False)
    return u @ wt


def decode_moments(arrays: dict[str, np.ndarray], spec: MergeSpec, prefix: str = "own") -> GroupMoments:
    """Flat dict of arrays (any encoding, legacy included) -> float64 own statistics, validated."""
    out: GroupMoments = {}
    for g, grp in spec.groups.items():
        b, d = _Block(arrays, f"{prefix}.{g}"), grp.dim
        n, head = b.count(), b.header()
        if head is None:
            mean, m2 = b.dense("mean", (d,)), b.dense("m2", (d, d))
        else:
            code, form, rank = head
            mean = b.side("mean", (d,))
            if form == DENSE:
                tri = b.payload("m2.tri", code, (d * (d + 1) // 2,))
                full = np.zeros((d, d))
                full[np.triu_indices(d)] = tri
                full = full + np.triu(full, 1).T
                if code in (2, 3):
                    s = b.positive("m2.scale", b.side("m2.scale", (d,)))
                    full = full * np.outer(s, s)
                m2 = full
            else:
                k = b.rank(rank, d)
                vecs = b.payload("m2.vecs", code, (d, k))
                vals = b.side("m2.vals", (k,))
                sigma2 = b.side("m2.sigma2", (1,))[0]
                if (vals < 0).any() or sigma2 < 0:
                    b.fail("negative eigenvalue in a low-rank covariance")
                if not (np.linalg.norm(vecs, axis=0) > 0.5).all():
                    b.fail("'m2.vecs' columns are not unit vectors")
                q = _orthonormal(vecs)
                m2 = (q * vals) @ q.T + sigma2 * (np.eye(d) - q @ q.T)
                m2 = (m2 + m2.T) / 2
        mean_t, m2_t = _t(mean), _t(m2)
        check_block(b.name, n, [(mean_t, (d,)), (m2_t, (d, d))], symmetric=m2_t)
        out[g] = Moments(n, mean_t, m2_t)
    return out


def decode_cross(arrays: dict[str, np.ndarray], spec: MergeSpec, prefix: str = "cross") -> GroupCross:
    """Flat dict of arrays (any encoding, legacy included) -> float64 cross statistics, validated."""
    out: GroupCross = {}
    for g, grp in spec.groups.items():
        b, d = _Block(arrays, f"{prefix}.{g}"), grp.dim
        n, head = b.count(), b.header()
        if head is None:
            ma, mb, c = b.dense("mean_a", (d,)), b.dense("mean_b", (d,)), b.dense("c", (d, d))
        else:
            code, form, rank = head
            ma, mb = b.side("mean_a", (d,)), b.side("mean_b", (d,))
            if form == DENSE:
                c = b.payload("c", code, (d, d))
                if code in (2, 3):
                    s = b.positive("c.scale", b.side("c.scale", (2 * d,)))
                    c = c * np.outer(s[:d], s[d:])
            else:
                k = b.rank(rank, d)
                left = b.payload("c.left", code, (d, k))
                right = b.payload("c.right", code, (d, k))
                vals = b.side("c.vals", (k,))
                c = (left * vals) @ right.T
        ts = [_t(ma), _t(mb), _t(c)]
        check_block(b.name, n, [(ts[0], (d,)), (ts[1], (d,)), (ts[2], (d, d))])
        out[g] = CrossMoments(n, *ts)
    return out


# --- helpers ----------------------------------------------------------------------------------------------------
def payload_bytes(arrays: dict[str, np.ndarray]) -> int:
    """Bytes of the array data (without any container overhead)."""
    return int(sum(np.asarray(a).nbytes for a in arrays.values()))


def block_encoding(arrays: dict[str, np.ndarray], name: str) -> dict:
    """What a block was sent as: {"dtype", "form", "rank"} (legacy blocks: float64 dense)."""
    key = f"{name}.enc"
    if key not in arrays:
        return {"dtype": "float64", "form": "dense", "rank": 0, "legacy": True}
    _, code, form, rank = (int(v) for v in np.asarray(arrays[key]))
    return {"dtype": DTYPES[code], "form": ("dense", "low-rank")[form], "rank": rank, "legacy": False}
