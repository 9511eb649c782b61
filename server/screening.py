"""Screening the round's checked training replies as a whole (methods of
:class:`~fedmerge.server.strategy.CCAMerge`): sample counts agreed without a server probe, the weight-norm bound
(reject or clip), and the own statistics recomputed from the uploaded weights with a server probe."""
from __future__ import annotations

import time
from collections import Counter
from logging import WARNING
from typing import Mapping

import numpy as np
import torch
from flwr.common.logger import log

from fedmerge.common.engine.stats import own_statistics

from .checks import ReplyRejected, check_own_matches, norm_outliers, weight_norm
from .history import RoundFailedError, RoundRecord
from .replies import ClientUpdate

__all__ = ["Screening"]


class Screening:
    """The round-level filters of phase 1, each ``(rec, accepted) -> kept``."""

    def _agree_on_counts(self, rec: RoundRecord, accepted: list[ClientUpdate]) -> list[ClientUpdate]:
        """Without a server probe the expected sample counts are unknown: the most common counts win and
        clients with other counts are rejected (statistics on another probe)."""
        if self.expected_counts is not None or self.stats_where != "clients" or not accepted:
            return accepted
        keys = [tuple(sorted((g, m.n) for g, m in u.own.items())) for u in accepted]
        common, votes = Counter(keys).most_common(1)[0]
        if 2 * votes <= len(keys):
            raise RoundFailedError(f"the clients' statistics disagree on the probe's sample counts and no counts "
                                   f"have a majority ({votes} of {len(keys)}); nobody is rejected")
        for u, k in zip(accepted, keys):
            if k != common:
                self._reject(rec, u.node, "train", f"statistics sample counts {dict(k)} differ from the other "
                             f"clients' {dict(common)}: computed on a different probe?")
        return [u for u, k in zip(accepted, keys) if k == common]


    def _bound_norms(self, rec: RoundRecord, accepted: list[ClientUpdate]) -> list[ClientUpdate]:
        """The weight-norm bound: clients outside [anchor / f, anchor * f] are rejected, or clipped."""
        if self.norm_bound is None or not accepted:
            return accepted
        norms = [weight_norm(u.state) for u in accepted]
        trusted = weight_norm(self._global) if self._global is not None else self.template_norm
        anchor, outliers = norm_outliers(norms, trusted, self.norm_bound)
        rec.merge_info["norm_anchor"] = anchor
        kept = []
        for i, u in enumerate(accepted):
            if i not in outliers:
                kept.append(u)
                continue
            ratio = norms[i] / anchor
            if self.norm_action == "clip" and ratio > 1:
                scale = self._clip(u, anchor * self.norm_bound, norms[i])
                u.clipped = True
                rec.clients_clipped[u.partition] = scale
                log(WARNING, "round %d: client %d's weights clipped (norm %.3g = %.3g x the anchor; scale %.3g)",
                    rec.round, u.partition, norms[i], ratio, scale)
                kept.append(u)
            else:
                self._reject(rec, u.node, "train", f"weight norm {norms[i]:.4g} is {ratio:.3g} x the median anchor "
                             f"{anchor:.4g} (allowed factor {self.norm_bound:g})")
        return kept


    def _verify_own(self, rec: RoundRecord, accepted: list[ClientUpdate]) -> list[ClientUpdate]:
        """With a server probe, every client's own statistics are recomputed from its uploaded weights (one
        forward pass over the probe), the client's are checked against them, and the merge uses the server's:
        own blocks decide the scale of every transform, so they are never taken on trust."""
        if self.fit is None or self.stats_where != "clients":
            return accepted
        t = time.time()
        kept = []
        for u in accepted:
            try:
                computed = own_statistics(self._model(u.state), self.fit, self.spec, device=self._dev())
                if not u.clipped:   # a clipped client's upload describes weights that are no longer merged
                    check_own_matches(u.own, computed, u.own_encoding)
            except ReplyRejected as exc:
                self._reject(rec, u.node, "train", str(exc))
                continue
            except Exception as exc:  # noqa: BLE001 - weights whose activations are not finite, for example
                self._reject(rec, u.node, "train", f"own statistics could not be recomputed ({type(exc).__name__}: "
                             f"{exc})")
                continue
            u.own = computed
            u.own_encoding = {g: {"dtype": "float64", "form": "dense"} for g in computed}
            kept.append(u)
        rec.timings["verify_statistics"] = time.time() - t
        return kept

    def _within_bound(self, rec: RoundRecord, state: Mapping[str, torch.Tensor]) -> bool:
        anchor = rec.merge_info.get("norm_anchor")
        return self.norm_bound is None or not anchor or weight_norm(state) <= self.norm_bound * anchor

    def _clip(self, u: ClientUpdate, bound: float, norm: float) -> float:
        """Scale the client's update (its weights minus the global model; the weights themselves in a round
        without one) so that the weight norm is at most ``bound``; returns the factor applied."""
        g = self._global
        if g is None:
            scale = bound / norm
            u.state = {k: v * scale if v.is_floating_point() else v for k, v in u.state.items()}
            return scale
        delta = {k: u.state[k].double() - g[k].double() for k in u.state if u.state[k].is_floating_point()}
        dn = float(np.sqrt(sum(float(d.pow(2).sum()) for d in delta.values())))
        scale = max(0.0, min(1.0, (bound - weight_norm(g)) / dn)) if dn > 0 else 1.0
        u.state = {k: ((g[k].double() + scale * delta[k]).to(v.dtype) if k in delta else v)
                   for k, v in u.state.items()}
        return scale
