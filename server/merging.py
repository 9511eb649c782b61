"""Choosing the reference and merging (methods of :class:`~fedmerge.server.strategy.CCAMerge`): every model is
aligned to the reference and averaged (weighted by sample counts), then BatchNorm is reset or REPAIR applied. A
merge that fails (non-finite transforms, or a merged model beyond the norm bound) is diagnosed by merging the
reference with each client alone; the clients whose pair fails are named, dropped, and the others merged."""
from __future__ import annotations

import time
from logging import WARNING
from typing import Callable, Sequence

import torch
import torch.nn as nn
from flwr.app import ArrayRecord, MetricRecord
from flwr.common.logger import log

from fedmerge.common import progress
from fedmerge.common.engine.merge import (
    METHODS,
    merge_from_statistics,
    probe_logits,
    probe_score,
    selection_candidates,
)
from fedmerge.common.engine.stats import Statistics, collect_statistics

from .checks import weight_norm
from .history import RoundFailedError, RoundRecord, cut
from .replies import ClientUpdate

__all__ = ["Merging", "subset", "LazyModels"]


def subset(stats: Statistics, keep: list[int]) -> Statistics:
    """The statistics of the models ``keep`` (indices, the reference among them), re-indexed."""
    ref = keep.index(stats.reference)
    return Statistics(own=[stats.own[i] for i in keep],
                      cross={(ref, j): stats.cross[(stats.reference, i)] for j, i in enumerate(keep) if j != ref},
                      reference=ref)


class LazyModels(Sequence):
    """The clients' models, each built from its weights when it is read (REPAIR reads each once): not N more
    model copies at once."""

    def __init__(self, states: list, build: Callable[[dict], nn.Module]):
        self.states, self.build = states, build

    def __len__(self) -> int:
        return len(self.states)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.build(s) for s in self.states[i]]
        return self.build(self.states[i])


class Merging:
    """Reference ranking, the merge, and the diagnosis of a failed merge."""

    def _ensemble_target(self, updates: Sequence[ClientUpdate]) -> torch.Tensor | None:
        """Without probe labels, the clients' mean logits on the held-out slice are the target for γ and the
        reference (agreement with the ensemble)."""
        if self.held is None or self.held.has_labels:
            return None
        return torch.stack([probe_logits(self._model(u.state), self.held, self._dev()) for u in updates]).mean(0)

    def _rank_references(self, accepted: list[ClientUpdate]) -> tuple[list[int], list[float], str]:
        """Candidate references, best first, with the scores and the rule that ranked them."""
        if self.held is not None:
            target = self._ensemble_target(accepted)
            scores = []
            for u in accepted:
                try:
                    scores.append(probe_score(probe_logits(self._model(u.state), self.held, self._dev()),
                                              self.held, target)[0])
                except Exception:  # noqa: BLE001 - a model that cannot be scored is never the reference
                    scores.append(float("-inf"))
            rule = "held-out probe accuracy" if self.held.has_labels else "agreement with the ensemble (no labels)"
        else:
            scores = [u.metrics.probe_accuracy if u.metrics.probe_accuracy is not None else 0.0 for u in accepted]
            rule = "client-reported probe accuracy (no server probe)"
        order = sorted(range(len(accepted)), key=lambda i: (-scores[i], accepted[i].partition))
        if self.reference != "best":
            parts = [u.partition for u in accepted]
            r = int(self.reference)
            if r in parts:
                order.remove(parts.index(r))
                order.insert(0, parts.index(r))
                rule = "fixed"
            else:
                log(WARNING, "reference client %d is not among the merged clients; using the best instead", r)
        return order, [float(s) for s in scores], rule


    # --- merge ------------------------------------------------------------------------------------
    def _merge_round(self, server_round: int, rec: RoundRecord, accepted: list[ClientUpdate]):
        if len(accepted) < self.min_clients:
            raise RoundFailedError(f"only {len(accepted)} valid client replies, fewer than min_clients="
                               f"{self.min_clients}")
        t = time.time()
        order, scores, rule = self._rank_references(accepted)
        rec.timings["select_reference"] = time.time() - t
        rec.merge_info.update({"reference_scores": scores, "reference_rule": rule})
        ranking = [accepted[i] for i in order]
        for attempt in range(self.max_reference_retries + 1):
            stats = None
            if self.stats_where == "clients":
                accepted, ref_u, stats = self._phase_two(server_round, rec, accepted, ranking)
            else:
                ref_u = next(u for u in ranking if u in accepted)
            if len(accepted) < self.min_clients:
                raise RoundFailedError(f"only {len(accepted)} clients left after the statistics phase, fewer than "
                                       f"min_clients={self.min_clients}")
            try:
                merged, info, t = self._merge(rec, accepted, stats, accepted.index(ref_u))
                break
            except Exception as exc:  # noqa: BLE001 - a merge that fails fails this round, not the federation
                error = f"{type(exc).__name__}: {cut(exc)}"
                rec.blamed = self._blame(rec, accepted, stats, accepted.index(ref_u))
            left = [u for u in accepted if u.partition not in rec.blamed]
            if (rec.blamed == [ref_u.partition] and len(left) >= self.min_clients
                    and attempt < self.max_reference_retries):
                self._reject(rec, ref_u.node, "merge",
                             f"as reference: the merge with every other client fails ({error})")
                accepted = left   # another reference, and its statistics phase
                continue
            if not rec.blamed or ref_u.partition in rec.blamed or len(left) < self.min_clients:
                who = f"; it fails on the data of client(s) {rec.blamed}" if rec.blamed else \
                    "; which client's data it fails on cannot be told apart"
                raise RoundFailedError(f"merge failed ({error}){who}")
            for u in accepted:   # the merge fails on these clients' data alone: merge the others
                if u.partition in rec.blamed:
                    self._reject(rec, u.node, "merge", f"the merge with the reference fails on this client's data "
                                 f"({error})")
            keep = [i for i, u in enumerate(accepted) if u.partition not in rec.blamed]
            stats = None if stats is None or self.stats_where != "clients" else subset(stats, keep)
            accepted = left
            try:
                merged, info, t = self._merge(rec, accepted, stats, accepted.index(ref_u))
            except Exception as again:  # noqa: BLE001
                raise RoundFailedError(f"merge failed ({type(again).__name__}: {cut(again)}) after dropping "
                                       f"client(s) {rec.blamed}") from None
            break
        counts = [float(u.metrics.num_examples) for u in accepted]
        weights = [c / sum(counts) for c in counts] if self.weighted else None
        rec.timings["merge"] = time.time() - t
        rec.timings.update({f"merge_{k}": v for k, v in info.timings.items()})
        for u in accepted:
            self.last_states[u.partition] = u.state
            self._register(u.node, u.partition)   # a partition is fixed by a node's first merged reply
        rec.ok = True
        rec.clients_merged = [u.partition for u in accepted]
        rec.reference = ref_u.partition
        rec.gamma = info.gamma
        rec.merge_info.update({"gamma_scores": {str(k): v for k, v in info.gamma_scores.items()},
                               "params": info.params, "gamma_selected_on": None if info.selected_on is None else
                               [accepted[i].partition for i in info.selected_on],
                               "bn_reset": info.bn_reset, "repair": info.repair,
                               "repair_target": info.repair_target, "bn_fold": info.bn_fold, "weights": weights,
                               "np_merge": info.np_merge, "distill": info.distill})
        progress.info("round %d: merged %d clients with %s in %.1f s (reference client %d by %s, gamma %s)",
                      server_round, len(accepted), self.method, rec.timings["merge"], rec.reference, rule, info.gamma)
        sd = {k: v.detach().cpu() for k, v in merged.state_dict().items()}
        metrics = MetricRecord({"clients-merged": len(accepted), "clients-rejected": len(rec.clients_rejected),
                                "num-examples": int(sum(counts))})
        return ArrayRecord(sd), metrics

    def _merge(self, rec: RoundRecord, accepted: list[ClientUpdate], stats: Statistics | None, ref: int):
        """(merged model, MergeInfo, start time of the merge) of ``accepted`` around ``accepted[ref]``; raises
        when the merge fails or leaves the norm bound."""
        states = [u.state for u in accepted]
        counts = [float(u.metrics.num_examples) for u in accepted]
        weights = [c / sum(counts) for c in counts] if self.weighted else None
        t = time.time()
        if self.stats_where == "server":
            stats = collect_statistics([self._model(s) for s in states], self.fit, reference=ref,
                                       pairs="all" if self.needs == "stats_all" else "reference", spec=self.spec,
                                       device=self._dev())
            rec.timings["server_statistics"] = time.time() - t
            t = time.time()
        merged, info = merge_from_statistics(
            self.template, states, self.spec, stats, method=self.method, reference=ref,
            gamma=self.gamma if METHODS[self.method].tunable_gamma else None, weights=weights,
            bn_reset=self.bn_reset, bn_fold=self.bn_fold, repair=self.repair, repair_target=self.repair_target,
            reset_batches=self.fit,
            eval_batches=self.held,
            eval_target=self._ensemble_target(accepted), gamma_grid=self.gamma_grid, device=self._dev(),
            repair_models=LazyModels(states, self._model) if self.repair or self.distill is not None else None,
            np_merge=self.np_merge, distill=self.distill,
            gamma_clients=self.gamma_clients if self.method == "cca" else None, **self.method_kwargs)
        if not self._within_bound(rec, merged.state_dict()):
            raise FloatingPointError(f"the merged weight norm {weight_norm(merged.state_dict()):.4g} exceeds "
                                     f"{self.norm_bound:g} x the anchor {rec.merge_info['norm_anchor']:.4g}")
        return merged, info, t

    def _blame(self, rec: RoundRecord, accepted: list[ClientUpdate], stats: Statistics | None, ref: int
               ) -> list[int]:
        """After a failed merge: merge the reference with each other client alone, with the round's statistics;
        the clients whose pair fails (or leaves the norm bound) are named. When every pair fails (two or more),
        the reference is named; with a single pair nobody is (the two cannot be told apart)."""
        cands = selection_candidates(self.method, self.gamma, self.method_kwargs, self.gamma_grid)
        fixed = dict(cands[len(cands) // 2]) if cands else {}   # one setting: a diagnosis, not a selection
        gamma = fixed.pop("gamma", self.gamma if METHODS[self.method].tunable_gamma else None)

        def fails(i: int, j: int) -> bool:
            states = [accepted[i].state, accepted[j].state]
            try:
                pair = None
                if self.stats_where == "clients" and stats is not None:
                    pair = Statistics(own=[stats.own[i], stats.own[j]], cross={(0, 1): stats.cross[(i, j)]},
                                      reference=0)
                elif self.stats_where == "server":
                    pair = collect_statistics([self._model(s) for s in states], self.fit, reference=0,
                                              pairs="all" if self.needs == "stats_all" else "reference",
                                              spec=self.spec, device=self._dev())
                merged, _ = merge_from_statistics(self.template, states, self.spec, pair, method=self.method,
                                                  reference=0, gamma=gamma, bn_reset=self.bn_reset,
                                                  bn_fold=self.bn_fold,
                                                  reset_batches=self.fit, device=self._dev(),
                                                  **{**self.method_kwargs, **fixed})
                return not self._within_bound(rec, merged.state_dict())
            except Exception:  # noqa: BLE001 - this is the diagnosis
                return True

        others = [i for i in range(len(accepted)) if i != ref]
        failing = [i for i in others if fails(ref, i)]
        if not failing:
            return []
        if len(others) >= 2 and len(failing) == len(others):
            return [accepted[ref].partition]
        if len(others) == 1:   # one pair: which of the two it fails on cannot be told apart
            return []
        return sorted(accepted[i].partition for i in failing)
