"""Experimental CCA variants measured by ``benchmarks.merge_quality`` (issue 20) that are not options of the
engine: each builds an :data:`~fedmerge.common.engine.matching.Alignment` from the engine's own pieces, which
``merge_alignment`` then averages and (optionally) REPAIRs as ``merge_models`` would.

- ``mean_basis``: a symmetric merge. The all-to-one CCA alignment re-expressed in the mean of the models' bases,
  ``G = mean_i T_i^-1`` (for two models ``(I + T_B^-1) / 2``: halfway between A's units and B's units seen in A's
  coordinates), each model's transform becoming ``G T_i``. ``condition`` reports ``cond(G)`` per group.
- ``sequential_cca``: each group's CCA transform estimated on networks whose earlier layers are already merged
  (the reference and the aligned model both run the merged prefix, then their own layers), the prefix plain or
  REPAIRed.
"""
from __future__ import annotations

import copy

import torch

from fedmerge.common.engine.align import aligned_row, merge_states
from fedmerge.common.engine.graph import MergeSpec
from fedmerge.common.engine.matching import DTYPE, Alignment, cca_pair
from fedmerge.common.engine.repair import apply_repair
from fedmerge.common.engine.stats import collect_statistics


def mean_basis(alignment: Alignment) -> tuple[Alignment, dict[int, float]]:
    """The alignment in the mean basis ``G = mean_i T_i^-1`` (pairs ``(G T_i, T_i^-1 G^-1)``) and cond(G) per group."""
    out, cond = {}, {}
    for g, pairs in alignment.items():
        gm = sum(t_inv for _, t_inv in pairs) / len(pairs)
        cond[g] = float(torch.linalg.cond(gm))
        out[g] = [(gm @ t, torch.linalg.solve(gm.T, t_inv.T).T) for t, t_inv in pairs]
    return out, cond


def _group_order(spec: MergeSpec) -> list[int]:
    """The merge groups in execution order of their first producer."""
    pos = {name: i for i, name in enumerate(spec.layers)}
    return sorted(spec.groups, key=lambda g: min(pos.get(p, len(pos)) for p in spec.groups[g].producers))


def _layer_params(spec: MergeSpec, groups: set[int], state: dict) -> list[str]:
    """The parameter names of the layers whose output lies in ``groups``."""
    names = [n for n, l in spec.layers.items() if l.out[0].group in groups]
    return [k for k in state if k.rpartition(".")[0] in names]


def sequential_cca(models, fit, spec: MergeSpec, gamma: float, weights=(0.5, 0.5), device=None,
                   repair_prefix: bool = False) -> Alignment:
    """Two models, reference 0: group by group in execution order, CCA between the reference and the aligned model
    where both run the merged (averaged, aligned) layers before the group; one statistics pass per group. With
    ``repair_prefix`` the merged layers are REPAIRed (average target) before the group's statistics, so that
    they carry the endpoints' unit statistics instead of the average's shrunken ones (one REPAIR per group)."""
    if len(models) != 2:
        raise ValueError("sequential_cca merges two models")
    states = [{k: v.detach().cpu() for k, v in m.state_dict().items()} for m in models]
    eye = {g: torch.eye(grp.dim, dtype=DTYPE) for g, grp in spec.groups.items()}
    row = {g: (eye[g], eye[g]) for g in spec.groups}
    done: set[int] = set()
    net_a, net_b = copy.deepcopy(models[0]).eval(), copy.deepcopy(models[1]).eval()
    for g in _group_order(spec):
        aligned_b = aligned_row(states[1], spec, row, None)
        sd_a, sd_b = dict(states[0]), dict(aligned_b)
        prefix = _layer_params(spec, done, states[0])
        if repair_prefix and prefix:
            alignment = {h: [(eye[h], eye[h]), row[h]] for h in spec.groups}
            merged_sd = merge_alignment(models, spec, alignment, list(weights), fit, True, device).state_dict()
        for k in prefix:
            merged = (merged_sd[k] if repair_prefix else
                      weights[0] * states[0][k].to(DTYPE) + weights[1] * aligned_b[k].to(DTYPE))
            sd_a[k] = sd_b[k] = merged.to(states[0][k].dtype)
        net_a.load_state_dict(sd_a)
        net_b.load_state_dict(sd_b)
        stats = collect_statistics([net_a, net_b], fit, reference=0, pairs="reference", spec=spec, device=device)
        row[g] = cca_pair(*stats.pair(0, 1, g), gamma=gamma)
        done.add(g)
    return {g: [(eye[g], eye[g]), row[g]] for g in spec.groups}


def merge_alignment(models, spec: MergeSpec, alignment: Alignment, weights, fit, repair: bool, device=None):
    """Average the models under ``alignment`` (reference 0) and, with ``repair``, REPAIR to the average target."""
    states = [{k: v.detach().cpu() for k, v in m.state_dict().items()} for m in models]
    merged = copy.deepcopy(models[0]).cpu()
    merged.load_state_dict(merge_states(states, spec, alignment, weights, 0))
    if repair:
        merged = apply_repair(merged, models, spec, alignment, weights, fit, device or torch.device("cpu"))
    return merged.eval()
