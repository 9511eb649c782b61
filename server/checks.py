"""Checks of client replies, as pure functions: every reply is untrusted input.

Each function takes what a client sent (records, decoded statistics) and what the server knows (the model's
keys and shapes, the probe's sample counts, the reference's own statistics) and either returns the checked
value or raises :class:`ReplyRejected` naming the check. The strategy (:mod:`fedmerge.server.strategy`) runs
them inside one guard per reply, so a reply that slips past a check and raises anything else is rejected
too, never crashing the round.

Bounds, and why (each is stated in README "Untrusted clients"):

* ``num-examples``: an integer in [1, the client's partition size when the server knows it, else
  ``max_examples``]; a float such as 1.5 or 1e308 is refused (it would steer a weighted average).
* Weights: the model's keys, shapes and dtypes; floating tensors of another float width are converted to the
  model's dtype (e.g. float64 -> float32) and must be finite *after* conversion; integer buffers must be
  integers. Norm bound (optional, on by default in the strategy): a client's weight norm must lie within a
  factor of the median over the round's clients and the server's own global model.
* Statistics: finite; per-unit variances and squared means at most :data:`MAX_VARIANCE` (activations beyond
  1e12 are not those of a working float32 network, and larger values overflow the CCA algebra); own
  covariance positive semidefinite up to the arithmetic of its transport and accumulation
  (:func:`psd_tolerance`); not all zero; sample counts equal to what the server's probe gives; with a server
  probe, equal (means, variances or trace within 5%) to what the server computes from the uploaded weights
  (:func:`check_own_matches`). Cross blocks:
  elementwise Cauchy-Schwarz against the two own blocks, canonical correlations <= 1 (joint covariance PSD),
  and means that agree with the reference's and the client's own means (the cross block was computed on
  these two models).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedmerge.common.engine.matching import single_threaded
from fedmerge.common.wire import keys as wire
from fedmerge.common.wire.compress import WHITEN_GAMMA, block_encoding
from fedmerge.common.wire.records import WireError, decode_array, record_to_arrays

__all__ = ["ReplyRejected", "CrossCheckFailed", "ClientMetrics", "record_bytes", "check_size", "read_int",
           "read_metrics", "read_echo", "check_echo", "decode_statistics", "decode_weights", "weight_norm",
           "norm_outliers", "psd_tolerance", "check_moments", "check_cross", "check_own_matches", "check_cross_matches",
           "transport", "MAX_VARIANCE", "MAX_EXAMPLES", "CROSS_CORR_TOL", "MEAN_TOL"]

MAX_VARIANCE = 1e24          # per-unit variance / squared mean of an activation
MAX_EXAMPLES = 10 ** 9        # num-examples cap when the server knows neither partition sizes nor a cap
ACCUMULATION_TOL = 2.0 ** -11  # float32 products over <= 8,192 samples: worst-case error k*u = 2^13 * 2^-24
WIRE_UNIT = {"float64": 2.0 ** -53, "float32": 2.0 ** -24, "float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}
CROSS_CORR_TOL = 0.05        # canonical correlations (whitened with the WHITEN_GAMMA trace ridge) may exceed 1 by this
# Low-rank blocks (stats_rank > 0) are approximations: whitened with PPCA own blocks, honest canonical
# correlations reach 2.3 on the test suite's clients; a low-rank group is only bounded by this factor.
LOW_RANK_CORR_TOL = 9.0
MEAN_TOL = 0.05              # RMS of (cross mean - own mean) / unit std over live units
FLOAT_KINDS = "f"


class ReplyRejected(ValueError):
    """A client reply failed a check; the message names the check."""


class CrossCheckFailed(ReplyRejected):
    """A cross block disagrees with the own blocks it was checked against (the client's or the reference's)."""


# --- records ----------------------------------------------------------------------------------------------------
def record_bytes(rd: RecordDict) -> int:
    total = 0
    for rec in list(rd.array_records.values()) + list(rd.metric_records.values()) + list(
            rd.config_records.values()):
        total += rec.count_bytes()
    return total


def check_size(rd: RecordDict, cap: int) -> int:
    size = record_bytes(rd)
    if size > cap:
        raise ReplyRejected(f"upload of {size} bytes exceeds the cap of {cap} bytes")
    return size


# --- metrics ----------------------------------------------------------------------------------------------------
def read_int(value: Any, what: str, lo: int, hi: int) -> int:
    """An integer in [lo, hi]: an int, or a float that is exactly an integer (Flower metrics are numbers)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ReplyRejected(f"{what} must be an integer, got {type(value).__name__}")
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(value) or not float(value).is_integer():
            raise ReplyRejected(f"{what} must be an integer, got {value!r}")
    v = int(value)
    if not lo <= v <= hi:
        raise ReplyRejected(f"{what} must be in [{lo}, {hi}], got {v}")
    return v


def _finite_number(value: Any, what: str, lo: float = -math.inf, hi: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ReplyRejected(f"metric {what} must be a number, got {type(value).__name__}")
    v = float(value)
    if not (math.isfinite(v) and lo <= v <= hi):
        raise ReplyRejected(f"metric {what} must be a finite number in [{lo}, {hi}], got {value!r}")
    return v


@dataclass(frozen=True)
class ClientMetrics:
    """What the server reads from a client's ``metrics`` record, checked."""

    num_examples: int | None
    partition: int | None
    probe_accuracy: float | None
    values: dict[str, float] = field(default_factory=dict)  # every finite scalar metric (for result.json)


def read_metrics(rd: RecordDict, *, need_examples: bool = True, max_examples: int = MAX_EXAMPLES,
                 num_partitions: int | None = None) -> ClientMetrics:
    """The ``metrics`` record: ``num-examples`` (an integer in [1, max_examples]), ``partition-id`` (an integer
    in [0, num_partitions)), ``probe-accuracy`` in [0, 1], ``seconds-*`` finite and >= 0; other keys are kept
    when they are finite scalars and dropped otherwise (they are only reported)."""
    if wire.METRICS not in rd.metric_records:
        raise ReplyRejected(f"reply has no '{wire.METRICS}' record")
    mr: MetricRecord = rd.metric_records[wire.METRICS]
    keys = list(mr.keys())
    n = None
    if need_examples:
        if wire.NUM_EXAMPLES not in keys:
            raise ReplyRejected(f"metrics have no {wire.NUM_EXAMPLES}")
        n = read_int(mr[wire.NUM_EXAMPLES], wire.NUM_EXAMPLES, 1, max_examples)
    part = None
    if wire.PARTITION_ID in keys:
        hi = (num_partitions - 1) if num_partitions else 2 ** 31
        part = read_int(mr[wire.PARTITION_ID], wire.PARTITION_ID, 0, hi)
    acc = None
    if wire.PROBE_ACCURACY in keys:
        acc = _finite_number(mr[wire.PROBE_ACCURACY], wire.PROBE_ACCURACY, 0.0, 1.0)
    values: dict[str, float] = {}
    for k in keys:
        v = mr[k]
        if k.startswith("seconds-"):
            values[k] = _finite_number(v, k, 0.0)
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
            values[k] = float(v)
    return ClientMetrics(n, part, acc, values)


def read_echo(rd: RecordDict, key: str) -> str | None:
    """A string the client echoes in its ``fedmerge`` config record (a probe or reference digest), or None."""
    cr: ConfigRecord | None = rd.config_records.get(wire.FEDMERGE)
    if cr is None or key not in cr.keys():
        return None
    v = cr[key]
    if not isinstance(v, str) or len(v) > 256:
        raise ReplyRejected(f"echoed {key} must be a short string")
    return v


def check_echo(rd: RecordDict, key: str, expected: str, mismatch: str) -> None:
    """The client must echo ``expected`` under ``key`` in its ``fedmerge`` config record."""
    echo = read_echo(rd, key)
    if echo is None:
        raise ReplyRejected(f"reply does not echo the {key.replace('-', ' ')} ({wire.FEDMERGE}.{key})")
    if echo != expected:
        raise ReplyRejected(mismatch)


def decode_statistics(rd: RecordDict, record: str, decode: Callable, spec, prefix: str, what: str):
    """(decoded blocks, {group: block encoding}) of a statistics record, or ReplyRejected naming the block."""
    if record not in rd.array_records:
        raise ReplyRejected(f"reply has no '{record}' record ({what})")
    try:
        arrays = record_to_arrays(rd.array_records[record])
        blocks = decode(arrays, spec)
    except (KeyError, ValueError) as exc:
        raise ReplyRejected(f"{what}: {exc}") from None
    return blocks, {g: block_encoding(arrays, f"{prefix}.{g}") for g in spec.groups}


# --- weights ----------------------------------------------------------------------------------------------------
def decode_weights(record: ArrayRecord, keys: Mapping[str, tuple[tuple[int, ...], torch.dtype]]
                   ) -> dict[str, torch.Tensor]:
    """A weights record -> a state dict of the model's dtypes, checked before allocation.

    Conversion rule: a floating payload of another float width (float16, float64) is converted to the
    model's floating dtype, and must be finite after conversion; integer buffers must be integers (bool or
    integer dtypes) within the model's integer range. Anything else is rejected."""
    got, want = set(record.keys()), set(keys)
    if got != want:
        missing, extra = sorted(want - got)[:5], sorted(got - want)[:5]
        raise ReplyRejected(f"weights keys differ from the global model (missing {missing}, unexpected {extra})")
    state = {}
    for k, (shape, dtype) in keys.items():
        try:
            a = decode_array(record[k], k, shape)
        except WireError as exc:
            raise ReplyRejected(f"weights: {exc}") from None
        if dtype.is_floating_point:
            if a.dtype.kind not in FLOAT_KINDS:
                raise ReplyRejected(f"weight '{k}' has dtype {a.dtype}, expected a float ({dtype})")
            with np.errstate(over="ignore", invalid="ignore"):
                t = torch.from_numpy(np.array(a, dtype=np.float64 if dtype == torch.float64 else np.float32))
            t = t.to(dtype)
            if not torch.isfinite(t).all():
                raise ReplyRejected(f"weight '{k}' contains NaN or Inf (after conversion to {dtype})")
            if k.endswith("running_var") and bool((t < 0).any()):
                raise ReplyRejected(f"weight '{k}' (a BatchNorm variance) has negative values")
        else:
            if a.dtype.kind not in "biu":
                raise ReplyRejected(f"weight '{k}' has dtype {a.dtype}, expected an integer ({dtype})")
            info = torch.iinfo(dtype) if dtype != torch.bool else None
            if info is not None and a.size and (int(a.max()) > info.max or int(a.min()) < info.min):
                raise ReplyRejected(f"weight '{k}' is outside the range of {dtype}")
            t = torch.from_numpy(np.array(a, dtype=np.int64)).to(dtype)
        state[k] = t
    return state


def weight_norm(state: Mapping[str, torch.Tensor]) -> float:
    """L2 norm over every floating tensor, accumulated in float64 (no overflow for float32 values)."""
    return math.sqrt(sum(float(v.double().pow(2).sum()) for v in state.values() if v.is_floating_point()))


def norm_outliers(norms: Sequence[float], trusted: float | None, factor: float) -> tuple[float, list[int]]:
    """(anchor, indices of norms outside [anchor / factor, anchor * factor]). The anchor is the median of the
    clients' norms together with the server's own (trusted) norm, so that with two clients one scaled upload
    cannot move it."""
    pool = list(norms) + ([trusted] if trusted is not None and trusted > 0 else [])
    anchor = float(np.median(pool)) if pool else 0.0
    if anchor <= 0:
        return anchor, []
    return anchor, [i for i, v in enumerate(norms) if not anchor / factor <= v <= anchor * factor]


# --- statistics -------------------------------------------------------------------------------------------------
def psd_tolerance(wire_dtype: str) -> float:
    """Smallest eigenvalue allowed, relative to the trace, for an honest covariance sent as ``wire_dtype``.

    A transported block differs from the exact one by E with |E_ij| <= u sqrt(S_ii S_jj) (float16/bfloat16 send
    the correlation matrix scaled by the unit std's; float32/64 round each entry), so ||E||_2 <= ||E||_F <=
    u tr(S) and lambda_min >= -u tr(S). The float32 products of the accumulation add at most k u_32 relative,
    k <= 8,192 samples per product (:data:`ACCUMULATION_TOL`)."""
    return WIRE_UNIT.get(wire_dtype, WIRE_UNIT["bfloat16"]) + ACCUMULATION_TOL


def _scale_ok(name: str, var: torch.Tensor, mean: torch.Tensor) -> None:
    if float(var.max()) > MAX_VARIANCE or float((mean * mean).max()) > MAX_VARIANCE:
        raise ReplyRejected(f"{name}: activation scale beyond {MAX_VARIANCE:.0e} (variance or squared mean)")


def check_moments(own: Mapping[int, Any], counts: Mapping[int, int] | None, tolerance: Mapping[int, float],
                  what: str = "own statistics") -> None:
    """Own blocks: sample counts, scale, not all zero, positive semidefinite within ``tolerance[g]``."""
    for g, m in own.items():
        name = f"{what}, group {g}"
        if counts is not None and m.n != counts[g]:
            raise ReplyRejected(f"{name}: {m.n} samples, the server's probe gives {counts[g]}: computed on a "
                                "different probe?")
        var = torch.diagonal(m.m2) / max(m.n - 1, 1)
        _scale_ok(name, var, m.mean)
        tr = float(torch.trace(m.m2))
        if not tr > 0:
            raise ReplyRejected(f"{name}: covariance is zero (no unit varies on the probe)")
        with single_threaded():   # a small dense eigensolve: see fedmerge.common.engine.matching.single_threaded
            lam = float(torch.linalg.eigvalsh((m.m2 + m.m2.T) / 2)[0])
        if lam < -tolerance[g] * tr:
            raise ReplyRejected(f"{name}: covariance is not positive semidefinite (smallest eigenvalue "
                                f"{lam:.3g}, allowed >= {-tolerance[g] * tr:.3g})")


def _ridged_diagonal(m2: torch.Tensor) -> torch.Tensor:
    d = torch.clamp(torch.diagonal(m2), min=0)
    return d + WHITEN_GAMMA * max(float(d.sum()) / d.numel(), 1e-300)


OWN_MATCH_TOL = 0.05   # relative difference allowed between a client's own block and the server's recomputation


def check_own_matches(claimed: Mapping[int, Any], computed: Mapping[int, Any], encodings: Mapping[int, Mapping],
                      what: str = "own statistics") -> None:
    """The client's own statistics against the server's own computation from the uploaded weights on the same
    probe: same means (RMS gap <= MEAN_TOL std), and per-unit variances (dense blocks; their transport keeps
    the diagonal to float32 precision) or the trace (low-rank blocks keep it exactly) within OWN_MATCH_TOL.
    Devices differ by ~1e-3 (TF32 convolutions); a lie about the scale of the activations does not pass."""
    for g, c in claimed.items():
        s = computed[g]
        name = f"{what}, group {g}"
        gap = _mean_gap(c.mean, s.mean, s.m2, s.n)
        if gap > MEAN_TOL:
            raise ReplyRejected(f"{name}: means differ from the uploaded weights' on the probe (RMS {gap:.3f} std)")
        vs, vc = torch.diagonal(s.m2), torch.diagonal(c.m2)
        if encodings.get(g, {}).get("form", "dense") == "dense":
            floor = 1e-3 * max(float(vs.mean()), 1e-300)
            rel = float(((vc - vs).abs() / (vs.abs() + floor)).max())
        else:
            rel = abs(float(vc.sum()) - float(vs.sum())) / max(float(vs.sum()), 1e-300)
        if not rel <= OWN_MATCH_TOL:
            raise ReplyRejected(f"{name}: variances differ from the uploaded weights' on the probe (relative "
                                f"{rel:.3g} > {OWN_MATCH_TOL})")


def check_cross_matches(claimed: Mapping[int, Any], computed: Mapping[int, Any],
                        wire: Mapping[int, tuple[bool, float]]) -> None:
    """A client's cross block against the server's own computation from the two uploaded models on the same
    probe: relative Frobenius difference within OWN_MATCH_TOL + 4 u sqrt(d) for dense blocks (half-precision
    transport, see :func:`check_cross`); low-rank blocks are approximations by design and are not compared.
    This pins the rotation CCA takes from the cross block, which the other checks cannot."""
    for g, c in claimed.items():
        low_rank, unit = wire.get(g, (False, WIRE_UNIT["float64"]))
        if low_rank:
            continue
        s = computed[g]
        rel = float(torch.linalg.matrix_norm(c.c - s.c)) / max(float(torch.linalg.matrix_norm(s.c)), 1e-300)
        tol = OWN_MATCH_TOL + 4 * unit * math.sqrt(max(s.c.shape))
        if not rel <= tol:
            raise ReplyRejected(f"cross statistics, group {g}: differ from the two uploaded models' on the probe "
                                f"(relative {rel:.3g} > {tol:.3g})")


def _whitener(m2: torch.Tensor, ridge: float) -> torch.Tensor:
    s = (m2 + m2.T) / 2
    d = s.shape[0]
    s = s + ridge * max(float(torch.trace(s)) / d, 1e-300) * torch.eye(d, dtype=s.dtype)
    w, v = torch.linalg.eigh(s)
    return (v / torch.sqrt(torch.clamp(w, min=1e-300))) @ v.T


def _mean_gap(mean_x: torch.Tensor, mean_own: torch.Tensor, m2_own: torch.Tensor, n: int) -> float:
    var = torch.clamp(torch.diagonal(m2_own) / max(n - 1, 1), min=0)
    live = var > max(float(var.mean()), 1e-300) * 1e-6
    if not bool(live.any()):
        return 0.0
    z = (mean_x - mean_own)[live] / torch.sqrt(var[live])
    return float(torch.sqrt((z * z).mean()))


def transport(encodings: Sequence[Mapping[int, Mapping]]) -> dict[int, tuple[bool, float]]:
    """Per group, over the blocks that meet in a cross check: (any sent in low rank, the largest unit
    round-off of their wire dtypes)."""
    groups = set().union(*(e.keys() for e in encodings))
    return {g: (any(e[g]["form"] != "dense" for e in encodings if g in e),
                max(WIRE_UNIT.get(e[g]["dtype"], WIRE_UNIT["bfloat16"]) for e in encodings if g in e))
            for g in groups}


def check_cross(cross: Mapping[int, Any], own_ref: Mapping[int, Any], own_b: Mapping[int, Any],
                counts: Mapping[int, int] | None, what: str = "cross statistics",
                wire: Mapping[int, tuple[bool, float]] | None = None, whiteners: dict | None = None) -> None:
    """Cross blocks against the reference's and the client's own blocks (see the module docstring).

    Raises ``ReplyRejected`` whose message starts with ``"reference mismatch"`` when the means disagree with
    the reference's own statistics (so the strategy can tell a stale or false reference from a bad client).
    ``wire``: per group (low rank?, unit round-off) of the three blocks (:func:`transport`; default: dense
    float64). Low rank: the correlation bound is :data:`LOW_RANK_CORR_TOL`. Half precision: the transport
    error of a dense d x d block is |e_ij| <= u r_i q_j (row and column scales), random in sign, so the
    whitened error's spectral norm is about u sqrt(d): the bound grows by 4 u sqrt(d), and the elementwise
    Cauchy-Schwarz test, which that error can cross for near-dead units, is left to float32/float64 blocks.
    ``whiteners``: a dict kept across the clients of one exchange, where the reference's whitening matrices
    are computed once (its own blocks are the same for every client)."""
    for g, c in cross.items():
        name = f"{what}, group {g}"
        low_rank, unit = (wire or {}).get(g, (False, WIRE_UNIT["float64"]))
        d = max(c.c.shape)
        tol = LOW_RANK_CORR_TOL if low_rank else CROSS_CORR_TOL + 4 * unit * math.sqrt(d)
        a, b = own_ref[g], own_b[g]
        expected = counts[g] if counts is not None else a.n
        if c.n != expected:
            raise ReplyRejected(f"{name}: {c.n} samples, expected {expected}: computed on a different probe?")
        _scale_ok(name, torch.zeros(1, dtype=c.c.dtype), torch.cat([c.mean_a, c.mean_b]))
        gap_b = _mean_gap(c.mean_b, b.mean, b.m2, b.n)
        if gap_b > MEAN_TOL:
            raise CrossCheckFailed(f"{name}: the model side's means differ from the client's own statistics "
                                f"(RMS {gap_b:.3f} std): computed on another model?")
        gap_a = _mean_gap(c.mean_a, a.mean, a.m2, a.n)
        if gap_a > MEAN_TOL:
            raise CrossCheckFailed(f"reference mismatch: {name}: the reference side's means differ from the "
                                f"reference's own statistics (RMS {gap_a:.3f} std): computed against another "
                                "reference?")
        # |c_ij| <= sqrt(A_ii B_jj) for the ridge-regularised own blocks A, B (the ridge only loosens the bound
        # for dense blocks, and low-rank blocks are built from exactly these whitened blocks, see compress)
        va = _ridged_diagonal(a.m2) * (c.n - 1) / max(a.n - 1, 1)
        vb = _ridged_diagonal(b.m2) * (c.n - 1) / max(b.n - 1, 1)
        bound = torch.sqrt(torch.outer(va, vb))
        if unit <= WIRE_UNIT["float32"] and bool((c.c.abs() > (1 + tol) * bound + 1e-300).any()):
            raise CrossCheckFailed(f"{name}: cross covariance exceeds the Cauchy-Schwarz bound of the own blocks")
        with single_threaded():   # small dense eigensolves: see fedmerge.common.engine.matching.single_threaded
            if whiteners is None or whiteners.get(g, (None,))[0] is not a.m2:
                wa = _whitener(a.m2, WHITEN_GAMMA)
                if whiteners is not None:
                    whiteners[g] = (a.m2, wa)
            else:
                wa = whiteners[g][1]
            w = wa @ c.c @ _whitener(b.m2, WHITEN_GAMMA) * math.sqrt(
                max(a.n - 1, 1) * max(b.n - 1, 1)) / max(c.n - 1, 1)
            top = float(torch.linalg.svdvals(w)[0])   # the spectral norm
        if top > 1 + tol:
            raise CrossCheckFailed(f"{name}: canonical correlation {top:.3f} > 1 (joint covariance not PSD)")
