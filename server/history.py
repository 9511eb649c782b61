"""What a round leaves behind: :class:`RoundRecord` (``CCAMerge.history``, result.json, a resumed run's
state.json), :class:`RoundFailedError`, and how a client's error text is cut before it is logged."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from fedmerge.common.engine.merge import METHODS

__all__ = ["RoundRecord", "RoundFailedError", "REASON_CHARS", "cut", "client_error"]

REASON_CHARS = 500   # a client's error text is untrusted: it is cut to this length in logs and result.json


@dataclass
class RoundRecord:
    """What happened in one round (kept in ``CCAMerge.history`` and written to result.json)."""

    round: int
    ok: bool = False
    method: str | None = None                                     # the method this round merged with
    error: str | None = None
    clients_merged: list[int] = field(default_factory=list)       # partition ids
    clients_rejected: list[dict] = field(default_factory=list)    # {node, partition, phase, reason}
    clients_clipped: dict[int, float] = field(default_factory=dict)  # partition -> scale applied (norm bound)
    blamed: list[int] = field(default_factory=list)               # partitions whose data alone fail the merge
    reference: int | None = None                                  # partition id of the reference
    gamma: float | None = None
    client_metrics: dict[int, dict] = field(default_factory=dict)  # partition id -> reported metrics
    bytes_uploaded: dict[int, int] = field(default_factory=dict)   # partition id -> bytes (both phases)
    bytes_weights: dict[int, int] = field(default_factory=dict)    # partition id -> bytes of the weights record
    bytes_statistics: dict[int, int] = field(default_factory=dict)  # partition id -> own + cross statistics bytes
    timings: dict[str, float] = field(default_factory=dict)
    merge_info: dict = field(default_factory=dict)

    _INT_KEYED = ("clients_clipped", "client_metrics", "bytes_uploaded", "bytes_weights", "bytes_statistics")

    @classmethod
    def from_dict(cls, d: dict) -> "RoundRecord":
        """From ``to_dict``'s output (a resumed run's state.json), every field's type checked (ValueError)."""
        check_record(d)
        kw = {k: d[k] for k in ("error", "reference", "gamma", "method") if k in d}
        kw.update({k: {int(p): v for p, v in dict(d.get(k, {})).items()} for k in cls._INT_KEYED})
        return cls(round=int(d["round"]), ok=bool(d["ok"]),
                   clients_merged=[int(p) for p in d.get("clients_merged", [])],
                   clients_rejected=[dict(r) for r in d.get("clients_rejected", [])],
                   blamed=[int(p) for p in d.get("blamed", [])], timings=dict(d.get("timings", {})),
                   merge_info=dict(d.get("merge_info", {})), **kw)

    def to_dict(self) -> dict:
        out = {"round": self.round, "ok": self.ok, "method": self.method, "error": self.error,
               "clients_merged": self.clients_merged,
               "clients_rejected": self.clients_rejected, "blamed": self.blamed, "reference": self.reference,
               "gamma": self.gamma, "timings": self.timings, "merge_info": self.merge_info}
        out.update({k: {str(p): v for p, v in getattr(self, k).items()} for k in self._INT_KEYED})
        return out


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_record(d) -> None:
    """The types a RoundRecord's fields must have when read back from JSON."""
    def need(ok: bool, field_: str, what: str) -> None:
        if not ok:
            raise ValueError(f"round record field '{field_}' must be {what}")

    need(isinstance(d, dict), "(record)", "an object")
    need(isinstance(d.get("round"), int) and not isinstance(d.get("round"), bool), "round", "an integer")
    need(isinstance(d.get("ok"), bool), "ok", "true or false")
    need(d.get("error") is None or isinstance(d.get("error"), str), "error", "a string or null")
    need(d.get("method") is None or d.get("method") in METHODS, "method", "a known method or null")
    for k in ("reference", "gamma"):
        need(d.get(k) is None or _number(d.get(k)), k, "a number or null")
    for k in ("clients_merged", "blamed"):
        need(isinstance(d.get(k, []), list) and all(isinstance(p, int) for p in d.get(k, [])), k, "a list of integers")
    need(isinstance(d.get("clients_rejected", []), list) and all(isinstance(r, dict) for r in d.get(
        "clients_rejected", [])), "clients_rejected", "a list of objects")
    for k in ("timings", "clients_clipped", "bytes_uploaded", "bytes_weights", "bytes_statistics"):
        need(isinstance(d.get(k, {}), dict) and all(_number(v) for v in d.get(k, {}).values()), k,
             "an object of finite numbers")
    need(isinstance(d.get("client_metrics", {}), dict) and all(
        isinstance(m, dict) and all(_number(v) for v in m.values()) for m in d.get("client_metrics", {}).values()),
        "client_metrics", "an object of objects of finite numbers")
    need(isinstance(d.get("merge_info", {}), dict), "merge_info", "an object")



class RoundFailedError(RuntimeError):
    """A round could not merge (too few valid clients, a failed merge); raised with ``on_failed_round='raise'``."""


def cut(text: str) -> str:
    text = str(text)
    return text if len(text) <= REASON_CHARS else text[:REASON_CHARS] + "…"


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def client_error(reason: str) -> str:
    """A client's error reply in one line: the runtime's traceback (Ray's included) cut to its last line."""
    lines = [ln.strip() for ln in _ANSI.sub("", str(reason)).splitlines() if ln.strip()]
    last = next((ln for ln in reversed(lines) if not ln.startswith(("^", "File ", "'>", ">"))), "")
    last = last.strip("'<> ") or "no reason given"
    return f"client error: {cut(last)}"

