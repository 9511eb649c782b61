"""Streaming activation statistics at every merge group, computable in pieces.

Per group and model: sample count, mean and the sum of centred outer products (``m2``); per (reference,
model) pair: the sum of centred cross products. Chunks are combined with Chan et al.'s parallel update in
float64, so memory is O(d^2) per group whatever the probe size, and statistics computed on parts of the
probe or by different parties combine exactly into the one-shot result.

Conv activations contribute every spatial position as a sample. Several sites of one group (the states of
a residual stream) pool their samples.

The pieces the Flower protocol exchanges:
  * :func:`own_statistics` (a client, its own model),
  * :func:`cross_statistics` (a client, its model against the reference it was sent),
  * :func:`collect_statistics` (everything at once, offline or on a server that holds the probe).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
import torch.nn as nn

from fedmerge.common.engine.graph import MergeSpec, derive_spec, trace
from fedmerge.common.engine.linalg import default_device
from fedmerge.common.wire.probe import Batches, as_batches

DTYPE = torch.float64
BLOCK = 8192  # samples per float32 product; the products are summed in float64


@dataclass
class Moments:
    """Statistics of one model at one group: n samples, mean (d,), m2 = sum (x-mean)(x-mean)^T (d, d)."""

    n: int
    mean: torch.Tensor
    m2: torch.Tensor

    @property
    def cov(self) -> torch.Tensor:
        return self.m2 / max(self.n - 1, 1)

    def combine(self, other: "Moments") -> "Moments":
        if self.n == 0:
            return other
        if other.n == 0:
            return self
        n = self.n + other.n
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.n / n)
        m2 = self.m2 + other.m2 + torch.outer(delta, delta) * (self.n * other.n / n)
        return Moments(n, mean, m2)

    @staticmethod
    def of(x: torch.Tensor) -> "Moments":
        """Moments of samples ``x`` (n, d)."""
        return Moments.of_units(x.T)

    @staticmethod
    def of_units(a: torch.Tensor) -> "Moments":
        """Moments of ``a`` in units-by-samples layout (d, n)."""
        c = _Centred(a)
        return Moments(c.n, c.mean, c.gram(c))


@dataclass
class CrossMoments:
    """Cross statistics of a pair at one group: c = sum (a - mean_a)(b - mean_b)^T (d_a, d_b)."""

    n: int
    mean_a: torch.Tensor
    mean_b: torch.Tensor
    c: torch.Tensor

    @property
    def cov(self) -> torch.Tensor:
        return self.c / max(self.n - 1, 1)

    def combine(self, other: "CrossMoments") -> "CrossMoments":
        if self.n == 0:
            return other
        if other.n == 0:
            return self
        n = self.n + other.n
        da, db = other.mean_a - self.mean_a, other.mean_b - self.mean_b
        c = self.c + other.c + torch.outer(da, db) * (self.n * other.n / n)
        return CrossMoments(n, self.mean_a + da * (other.n / n), self.mean_b + db * (other.n / n), c)

    @staticmethod
    def of(a: torch.Tensor, b: torch.Tensor) -> "CrossMoments":
        """Cross moments of paired samples ``a`` (n, d_a) and ``b`` (n, d_b)."""
        ca, cb = _Centred(a.T), _Centred(b.T)
        return CrossMoments(ca.n, ca.mean, cb.mean, ca.gram(cb))


class _Centred:
    """One chunk of activations (d, n), centred once and reused for its own and its cross products.

    The products run in the activations' dtype over blocks of at most ``BLOCK`` samples (float32 BLAS;
    float64 would double the cost of the bulk of the work); the blocks' products are summed in float64,
    and so are the chunks (Chan's update, :meth:`Moments.combine`); the
    chunk mean comes from torch's pairwise-summed reduction. ``owned=True`` lets the chunk be centred in
    place (a copy made for this purpose). A non-finite mean means non-finite activations: raised by the
    caller with context.
    """

    def __init__(self, a: torch.Tensor, owned: bool = False):
        if a.dtype not in (torch.float32, torch.float64):
            a, owned = a.float(), True
        self.n = a.shape[1]
        mean = a.mean(1)
        self.mean = mean.to(DTYPE)
        self.x = a.sub_(mean[:, None]) if owned else a - mean[:, None]

    @property
    def finite(self) -> bool:
        return bool(torch.isfinite(self.mean).all())

    def gram(self, other: "_Centred") -> torch.Tensor:
        if self.x.dtype == DTYPE:
            return self.x @ other.x.T
        out = None
        for a, b in zip(self.x.split(BLOCK, 1), other.x.split(BLOCK, 1)):
            g = (a @ b.T).to(DTYPE)
            out = g if out is None else out.add_(g)
        return out


GroupMoments = dict[int, Moments]
GroupCross = dict[int, CrossMoments]


@dataclass
class Statistics:
    """Everything the matching methods read: per-model own blocks and per-pair cross blocks, per group."""

    own: list[GroupMoments]
    cross: dict[tuple[int, int], GroupCross] = field(default_factory=dict)
    reference: int = 0

    @property
    def num_models(self) -> int:
        return len(self.own)

    def pair(self, i: int, j: int, g: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(S_ii, S_jj, S_ij) covariances of models i, j at group g."""
        if (i, j) in self.cross:
            s_ij = self.cross[(i, j)][g].cov
        elif (j, i) in self.cross:
            s_ij = self.cross[(j, i)][g].cov.T
        elif i == j:
            s_ij = self.own[i][g].cov
        else:
            raise KeyError(f"no cross statistics between models {i} and {j}: collect them with pairs='all'")
        return self.own[i][g].cov, self.own[j][g].cov, s_ij

    def has_pair(self, i: int, j: int) -> bool:
        return i == j or (i, j) in self.cross or (j, i) in self.cross


# --- extraction ---------------------------------------------------------------------------------------------
def site_extractor(model: nn.Module, spec: MergeSpec) -> nn.Module:
    """A GraphModule sharing ``model``'s parameters that returns the site activations (and nothing after)."""
    gm = trace(model)
    nodes = {n.name: n for n in gm.graph.nodes}
    missing = [s for s in spec.site_nodes if s not in nodes]
    if missing:
        raise ValueError(f"model does not match the merge spec: nodes {missing} not found")
    out = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(out):
        gm.graph.output(tuple(nodes[s] for s in spec.site_nodes))
    gm.graph.erase_node(out)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _units(t: torch.Tensor) -> torch.Tensor:
    """(N, C, *spatial) -> (C, N * prod(spatial)): units by samples, a fresh contiguous copy."""
    if t.dim() == 2:
        return t.T.contiguous()
    return t.transpose(0, 1).reshape(t.shape[1], -1)


def group_features(spec: MergeSpec, site_values: Sequence[torch.Tensor]) -> dict[int, list[torch.Tensor]]:
    """Per merge group, the activations of each of its sites as (units, samples) matrices (the sites of a
    residual stream pool their samples: their statistics are combined, never concatenated)."""
    by_site = dict(zip(spec.site_nodes, site_values))
    return {g: [_units(by_site[s]) for s in grp.sites] for g, grp in spec.groups.items()}


def _centred(parts: list[torch.Tensor], who: str, g: int) -> list[_Centred]:
    out = []
    for a in parts:
        c = _Centred(a, owned=True)
        if not c.finite:
            raise FloatingPointError(f"{who}: non-finite activations at merge group {g}")
        out.append(c)
    return out


@torch.no_grad()
def _stream(models: Sequence[nn.Module], spec: MergeSpec, batches: Batches, device) -> Iterable[list[dict]]:
    dev = default_device(device)
    extractors = []
    states = []
    for m in models:
        states.append((m.training, next(iter(m.parameters())).device))
        m.eval().to(dev)
        extractors.append(site_extractor(m, spec))
    try:
        for x, _ in batches:
            x = x.to(dev)
            yield [group_features(spec, ex(x)) for ex in extractors]
    finally:
        for m, (training, d) in zip(models, states):
            m.train(training).to(d)


@torch.no_grad()
def samples_per_input(model: nn.Module, spec: MergeSpec, example: torch.Tensor) -> dict[int, int]:
    """Statistics samples one probe input adds at each group: 1 for a dense unit, every spatial position of a
    conv site, summed over the sites a residual stream pools. ``n`` of an honest block is this times the
    number of probe inputs."""
    was_training = model.training
    model.eval()
    try:
        feats = group_features(spec, site_extractor(model, spec)(example[:1].to(next(model.parameters()).device)))
    finally:
        model.train(was_training)
    return {g: int(sum(p.shape[1] for p in parts)) for g, parts in feats.items()}


def own_statistics(model: nn.Module, probe, spec: MergeSpec | None = None, device=None) -> GroupMoments:
    """Statistics of one model on the probe (what a client uploads after training)."""
    batches = as_batches(probe)
    spec = spec or derive_spec(model, batches.example())
    acc: GroupMoments = {g: Moments(0, None, None) for g in spec.groups}
    for (f,) in _stream([model], spec, batches, device):
        for g, parts in f.items():
            for c in _centred(parts, "model", g):
                acc[g] = acc[g].combine(Moments(c.n, c.mean, c.gram(c)))
    return {g: _cpu(m) for g, m in acc.items()}


def cross_statistics(reference: nn.Module, model: nn.Module, probe, spec: MergeSpec | None = None,
                     device=None, cache: "ReferenceActivations | None" = None) -> GroupCross:
    """Cross statistics between the reference and ``model`` (a client answering the server's query).

    ``cache``: the reference's centred activations on this probe (:class:`ReferenceActivations`), computed once
    for every model compared with it; the result is the same (the same activations, the same products)."""
    batches = as_batches(probe)
    spec = spec or derive_spec(reference, batches.example())
    acc: GroupCross = {g: CrossMoments(0, None, None, None) for g in spec.groups}
    if cache is not None and cache.chunks is not None:
        pairs = ((ref, {g: _centred(f[g], "model", g) for g in spec.groups})
                 for ref, (f,) in zip(cache.chunks, _stream([model], spec, batches, device)))
    else:
        pairs = (({g: _centred(fa[g], "reference", g) for g in spec.groups},
                  {g: _centred(fb[g], "model", g) for g in spec.groups})
                 for fa, fb in _stream([reference, model], spec, batches, device))
    for ref, own in pairs:
        for g in spec.groups:
            for ca, cb in zip(ref[g], own[g]):
                acc[g] = acc[g].combine(CrossMoments(ca.n, ca.mean, cb.mean, ca.gram(cb)))
    return {g: _cpu(m) for g, m in acc.items()}


class ReferenceActivations:
    """The reference model's centred activations at every merge group on a probe, computed once so that the
    cross statistics of N models against one reference take N + 1 forward passes instead of 2N. Kept only when
    they take at most ``max_bytes`` (estimated from the probe's size before anything runs); otherwise
    ``chunks`` is None and :func:`cross_statistics` recomputes them per model, as without a cache."""

    def __init__(self, reference: nn.Module, probe, spec: MergeSpec, device=None, max_bytes: int = 2 ** 29):
        batches = as_batches(probe)
        per = samples_per_input(reference, spec, batches.example())
        itemsize = next(iter(reference.parameters())).element_size()
        self.bytes = sum(per[g] * grp.dim for g, grp in spec.groups.items()) * batches.num_samples * itemsize
        self.chunks: list[dict[int, list[_Centred]]] | None = None
        if self.bytes <= max_bytes:
            self.chunks = [{g: _centred(f[g], "reference", g) for g in spec.groups}
                           for (f,) in _stream([reference], spec, batches, device)]


def collect_statistics(models: Sequence[nn.Module], probe, reference: int = 0, pairs: str = "reference",
                       spec: MergeSpec | None = None, device=None,
                       own_of: Sequence[int] | None = None) -> Statistics:
    """All statistics in one pass over the probe: own blocks of every model (of the models ``own_of`` only, when
    given; the others' are left empty, ``{}``) and cross blocks of (reference, i) for every i
    (``pairs="reference"``, all that all-to-one needs) or of every pair (``pairs="all"``, for ZipIt! with more
    than two models)."""
    if pairs not in ("reference", "all"):
        raise ValueError(f"pairs must be 'reference' or 'all', got {pairs!r}")
    batches = as_batches(probe)
    n = len(models)
    if not 0 <= reference < n:
        raise ValueError(f"reference index {reference} out of range for {n} models")
    wanted = set(range(n)) if own_of is None else set(own_of)
    if not wanted <= set(range(n)):
        raise ValueError(f"own_of {sorted(wanted)} names models outside [0, {n})")
    spec = spec or derive_spec(models[0], batches.example())
    keys = ([(reference, i) for i in range(n) if i != reference] if pairs == "reference"
            else [(i, j) for i in range(n) for j in range(i + 1, n)])
    own = [{g: Moments(0, None, None) for g in spec.groups} for _ in range(n)]
    cross = {k: {g: CrossMoments(0, None, None, None) for g in spec.groups} for k in keys}
    for feats in _stream(models, spec, batches, device):
        for g in spec.groups:
            centred = [_centred(feats[i][g], f"model {i}", g) for i in range(n)]  # each chunk centred once
            for i in wanted:
                for c in centred[i]:
                    own[i][g] = own[i][g].combine(Moments(c.n, c.mean, c.gram(c)))
            for (i, j) in keys:
                for ci, cj in zip(centred[i], centred[j]):
                    cross[(i, j)][g] = cross[(i, j)][g].combine(CrossMoments(ci.n, ci.mean, cj.mean, ci.gram(cj)))
            del centred
    return Statistics(own=[{g: _cpu(m) for g, m in o.items()} if i in wanted else {} for i, o in enumerate(own)],
                      cross={k: {g: _cpu(m) for g, m in c.items()} for k, c in cross.items()},
                      reference=reference)


def _cpu(m):
    if isinstance(m, Moments):
        if m.n == 0:
            raise ValueError("empty probe: no samples to compute statistics from")
        return Moments(m.n, m.mean.cpu(), m.m2.cpu())
    if m.n == 0:
        raise ValueError("empty probe: no samples to compute statistics from")
    return CrossMoments(m.n, m.mean_a.cpu(), m.mean_b.cpu(), m.c.cpu())


def check_block(name, n, arrays, symmetric=None):
    if n <= 1:
        raise ValueError(f"statistics block '{name}': sample count {n} must be > 1")
    for t, shape in arrays:
        if tuple(t.shape) != shape:
            raise ValueError(f"statistics block '{name}': shape {tuple(t.shape)}, expected {shape}")
        if not torch.isfinite(t).all():
            raise ValueError(f"statistics block '{name}': non-finite values")
    if symmetric is not None:
        scale = symmetric.abs().max().clamp_min(1e-300)
        if (symmetric - symmetric.T).abs().max() > 1e-6 * scale:
            raise ValueError(f"statistics block '{name}': covariance is not symmetric")
        if torch.diagonal(symmetric).min() < -1e-9 * scale:
            raise ValueError(f"statistics block '{name}': covariance has a negative variance")
