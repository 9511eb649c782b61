"""Identity: the server's node -> partition map is the only identity (:class:`Identities`, a part of
:class:`~fedmerge.server.strategy.CCAMerge`; its state is initialised in ``CCAMerge.__init__``).

A node's partition is fixed by its first merged reply (the partition the server proposed, or the one the node has
of its own, if no other node holds it) or given up front (``node_partitions``); afterwards a reply that reports
another partition is rejected.
"""
from __future__ import annotations

import time
from logging import WARNING
from typing import Mapping

from flwr.common.logger import log
from flwr.serverapp import Grid

from .checks import MAX_EXAMPLES, ReplyRejected
from .history import RoundRecord, cut
from .replies import ClientUpdate

__all__ = ["Identities"]


class Identities:
    """Sampling nodes, naming them, and fixing each node's partition (methods of CCAMerge)."""

    partitions: dict[int, int]
    num_partitions: int | None

    def _sample(self, grid: Grid) -> list[int]:
        want = self.num_clients or self.min_clients
        t0 = time.time()
        while True:
            nodes = sorted(int(n) for n in grid.get_node_ids())
            if len(nodes) >= want:
                break
            if time.time() - t0 > self.wait_for_clients and len(nodes) >= self.min_clients:
                log(WARNING, "only %d of %d expected clients connected; going on", len(nodes), want)
                break
            time.sleep(0.5)
        if self.num_partitions is None:
            self.num_partitions = len(nodes)
        self._proposed, self._claimed = {}, {}
        taken = set(self.partitions.values())
        free = [p for p in range(self.num_partitions) if p not in taken]
        sampled = []
        for n in nodes:
            if n in self.partitions:
                sampled.append(n)
            elif free:
                self._proposed[n] = free.pop(0)
                sampled.append(n)
        left = [n for n in nodes if n not in sampled]
        if left:
            log(WARNING, "nodes %s have no free partition (of %d); not sampled", left, self.num_partitions)
        return sampled

    def _label(self, node: int) -> int:
        """How logs and result.json name a node: its registered partition, else the valid partition it claims
        this round (its own --node-config, e.g. under Ray), else the one the server proposed."""
        if node in self.partitions:
            return self.partitions[node]
        return self._claimed.get(node, self._proposed.get(node, -1))

    def _identify(self, node: int, claimed: int | None) -> int:
        """The node's partition: the registered one (a different claim is rejected), else its claim (or the
        server's proposal) if no other node holds it. Registered by :meth:`_register` only once the client is
        merged, so a rejected reply never takes a partition; clashes within a round: :meth:`_settle_claims`."""
        registered = self.partitions.get(node)
        if registered is not None:
            if claimed is not None and claimed != registered:
                raise ReplyRejected(f"reports partition {claimed}, but node {node} is partition {registered}")
            return registered
        part = claimed if claimed is not None else self._proposed.get(node)
        if part is None:
            raise ReplyRejected("reports no partition-id and none was assigned")
        owner = next((n for n, p in self.partitions.items() if p == part), None)
        if owner is not None:
            raise ReplyRejected(f"claims partition {part}, which belongs to node {owner}")
        return part

    def _register(self, node: int, part: int) -> None:
        if node not in self.partitions:
            self.partitions[node] = part
            self._proposed.pop(node, None)

    def _examples_cap(self, part: int) -> int:
        cap = self.max_examples
        if cap is None:
            return MAX_EXAMPLES
        if callable(cap):
            return int(cap(part))
        if isinstance(cap, Mapping):
            return int(cap.get(part, MAX_EXAMPLES))
        return int(cap)

    def _settle_claims(self, rec: RoundRecord, accepted: list[ClientUpdate]) -> list[ClientUpdate]:
        """Unregistered nodes that passed every check so far and claim the same partition: the node the server
        proposed it to keeps it; if none of them was, none keeps it (no order decides)."""
        by_part: dict[int, list[ClientUpdate]] = {}
        for u in accepted:
            by_part.setdefault(u.partition, []).append(u)
        kept = []
        for part, us in by_part.items():
            if len(us) == 1:
                kept.extend(us)
                continue
            owner = next((u for u in us if self._proposed.get(u.node) == part), None)
            for u in us:
                if u is owner:
                    kept.append(u)
                else:
                    who = f"the server proposed it to node {owner.node}" if owner else \
                        f"nodes {sorted(v.node for v in us)} claim it and the server proposed it to none of them"
                    self._claimed.pop(u.node, None)   # named by its proposal, not by the claim it lost
                    self._reject(rec, u.node, "train", f"claims partition {part}: {who}")
        return kept

    def _reject(self, rec: RoundRecord, node: int, phase: str, reason: str) -> None:
        """Drop a node from this round with a reason (history, the log and result.json)."""
        part = self._label(node)
        rec.clients_rejected.append({"node": node, "partition": part, "phase": phase, "reason": cut(reason)})
        log(WARNING, "round %d: rejected client %s (node %d) in %s: %s", rec.round, part, node, phase, cut(reason))
