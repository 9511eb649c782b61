"""The baseline matching methods, gathered (each lives in its own module; all have the one matching signature
``fn(inputs: MatchInputs, spec, reference=0, **hyper) -> Alignment`` of :mod:`fedmerge.common.engine.matching`):

* :func:`match_ot` (:mod:`~fedmerge.common.engine.ot`) -- optimal-transport fusion (Singh & Jaggi, NeurIPS 2020),
  activation-based cost.
* :func:`match_zipit` (:mod:`~fedmerge.common.engine.zipit`) -- ZipIt! (Stoica et al., ICLR 2024): greedy zipping
  of all N models' features.
* :func:`match_weights`, :func:`match_merge_many` (:mod:`~fedmerge.common.engine.weight_matching`) -- Git Re-Basin
  weight matching and MergeMany (Ainsworth et al., ICLR 2023).

A merged layer is ``sum_i w_i T_i,out W_i T_i,in^-1`` (:mod:`fedmerge.common.engine.align`), so an all-to-one
method gives ``T`` mapping model i's units onto the reference's and ``T_inv`` what the layers consuming the group
apply on their input side; the reference gets the identity.
"""
from __future__ import annotations

from fedmerge.common.engine.ot import OT_COSTS, match_ot, ot_cost, ot_pair
from fedmerge.common.engine.weight_matching import match_merge_many, match_weights
from fedmerge.common.engine.zipit import match_zipit, zipit_group

__all__ = ["match_ot", "match_zipit", "match_weights", "match_merge_many", "ot_cost", "ot_pair", "zipit_group",
           "OT_COSTS"]
