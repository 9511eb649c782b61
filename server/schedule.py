"""The method of each round (methods of :class:`~fedmerge.server.strategy.CCAMerge`): ``method_schedule``
``None`` (the configured method in every round), ``"auto"`` (the method while clients start from their own
initialisations, plain averaging once they start from the global model) or an explicit list."""
from __future__ import annotations

from fedmerge.common.engine.merge import METHODS
from fedmerge.common.task.config import SCHEDULE_AUTO

__all__ = ["MethodSchedule"]


class MethodSchedule:
    """Which method a round merges with, and what that method needs."""

    method_schedule: tuple[str, ...] | str | None
    base_method: str
    stats_on_server: bool

    # --- the method of each round -------------------------------------------------------------------------

    def scheduled_methods(self) -> tuple[str, ...]:
        """Every method a round may use (the configured one first, unless an explicit schedule replaces it)."""
        s = self.method_schedule
        if s is None:
            return (self.base_method,)
        if s == SCHEDULE_AUTO:
            return (self.base_method, "avg")
        return tuple(dict.fromkeys(s))

    def method_for_round(self, server_round: int, from_global: bool) -> str:
        """The method of round ``server_round`` (1-based, resumed rounds included): the configured method
        without a schedule; with ``"auto"`` the configured method when the clients start from their own
        initialisations (``from_global`` false: no global weights sent) and plain averaging when they all start
        from the global model; with an explicit schedule its entry ``min(round, len) - 1``."""
        s = self.method_schedule
        if s is None:
            return self.base_method
        if s == SCHEDULE_AUTO:
            return "avg" if from_global else self.base_method
        return s[min(max(server_round, 1), len(s)) - 1]

    def _schedule_text(self) -> str:
        s = self.method_schedule
        return "none" if s is None else s if isinstance(s, str) else ",".join(s)

    def _use_method(self, method: str) -> None:
        """Make ``method`` this round's: what it needs and where its statistics are computed."""
        self.method = method
        self.needs = METHODS[method].needs
        if self.needs == "stats_all" or (self.stats_on_server and self.needs == "stats"):
            self.stats_where = "server"
        elif self.needs == "stats":
            self.stats_where = "clients"
        else:
            self.stats_where = "none"

