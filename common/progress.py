"""What a person watching a run sees: progress of client training, rounds, statistics and the merge.

Two outputs, one switch:

* ``log`` lines from the ``flwr.fedmerge`` logger (rounds, phases, the merge). It is a child of Flower's
  logger, so a Flower user sees them in Flower's own format with no set-up; :func:`quiet_flower` hides
  Flower's own INFO lines (``fedmerge simulate`` / ``demo`` without ``--verbose``) and keeps these.
* :func:`bar` for loops with a known length (training steps): a live bar on a terminal; elsewhere (log
  files, CI, Ray workers) one line per ``interval`` seconds and one when it finishes.

``FEDMERGE_PROGRESS`` chooses: ``auto`` (default: bars on a terminal, lines elsewhere), ``bar``, ``lines``
or ``off`` (no bars or lines; the log lines stay). ``FEDMERGE_VERBOSE=1`` (or ``--verbose``) also shows
Flower's own INFO lines. Any other value of either is an error.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import time

__all__ = ["LOGGER", "info", "bar", "mode", "quiet_flower", "verbose_from_env", "dropped", "MODES"]

LOGGER = logging.getLogger("flwr.fedmerge")
LOGGER.setLevel(logging.INFO)

MODES = ("auto", "bar", "lines", "off")


def mode() -> str:
    """The progress mode from ``FEDMERGE_PROGRESS`` (``auto`` resolved to ``bar`` or ``lines``)."""
    m = os.environ.get("FEDMERGE_PROGRESS", "auto").strip().lower() or "auto"
    if m not in MODES:
        raise ValueError(f"FEDMERGE_PROGRESS must be one of {', '.join(MODES)}, got {m!r}")
    if m == "auto":
        return "bar" if sys.stderr.isatty() else "lines"
    return m


def info(msg: str, *args) -> None:
    """One progress line (``%``-style arguments, as :mod:`logging`)."""
    LOGGER.info(msg, *args)


def verbose_from_env() -> bool:
    """``FEDMERGE_VERBOSE``: 1/true/yes or 0/false/no/unset; any other value is an error."""
    v = os.environ.get("FEDMERGE_VERBOSE", "").strip().lower()
    if v in ("", "0", "false", "no"):
        return False
    if v in ("1", "true", "yes"):
        return True
    raise ValueError(f"FEDMERGE_VERBOSE must be 1/true/yes or 0/false/no, got {v!r}")


def quiet_flower(verbose: bool | None = None) -> None:
    """Show Flower's own INFO lines only when ``verbose`` (``None``: ``FEDMERGE_VERBOSE``); fedmerge's progress
    lines and every warning stay."""
    if verbose is None:
        verbose = verbose_from_env()
    from flwr.common.logger import (
        update_console_handler,  # its import sets Flower's level: set ours after it
    )

    update_console_handler(colored=sys.stderr.isatty())      # no colour codes in log files
    logging.getLogger("flwr").setLevel(logging.DEBUG if verbose else logging.WARNING)
    LOGGER.setLevel(logging.INFO)


class _Drop(logging.Filter):
    def __init__(self, texts: tuple[str, ...]):
        super().__init__()
        self.texts = texts

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(t in msg for t in self.texts)


@contextlib.contextmanager
def dropped(*texts: str):
    """Within the block, Flower log lines that contain any of ``texts`` are not shown (known, harmless noise)."""
    f = _Drop(texts)
    logger = logging.getLogger("flwr")
    logger.addFilter(f)
    try:
        yield
    finally:
        logger.removeFilter(f)


class _Lines:
    """A bar for logs: a line every ``interval`` seconds and one at the end."""

    def __init__(self, total: int, desc: str, unit: str, interval: float):
        self.total, self.desc, self.unit, self.interval = total, desc, unit, interval
        self.n, self.postfix = 0, ""
        self.t0 = self.last = time.monotonic()

    def update(self, k: int = 1) -> None:
        self.n += k
        now = time.monotonic()
        if now - self.last >= self.interval and self.n < self.total:
            self.last = now
            info("%s: %d/%d %s (%.0f%%), %.0f s%s", self.desc, self.n, self.total, self.unit,
                 100.0 * self.n / max(1, self.total), now - self.t0, self.postfix)

    def set_postfix_str(self, s: str) -> None:
        self.postfix = f", {s}"

    def close(self) -> None:
        info("%s: %d %s in %.1f s%s", self.desc, self.n, self.unit, time.monotonic() - self.t0, self.postfix)


class _Off:
    def update(self, k: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass


class _Bar:
    def __init__(self, total: int, desc: str, unit: str):
        from tqdm.auto import tqdm

        self._t = tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True, file=sys.stderr)
        self.desc, self.unit, self.t0 = desc, unit, time.monotonic()
        self.postfix = ""

    def update(self, k: int = 1) -> None:
        self._t.update(k)

    def set_postfix_str(self, s: str) -> None:
        self.postfix = f", {s}"
        self._t.set_postfix_str(s, refresh=False)

    def close(self) -> None:
        n = self._t.n
        self._t.close()
        info("%s: %d %s in %.1f s%s", self.desc, n, self.unit, time.monotonic() - self.t0, self.postfix)


def bar(total: int, desc: str, unit: str = "step", enabled: bool = True, interval: float = 15.0):
    """A progress bar with ``update``, ``set_postfix_str`` and ``close`` (which logs one summary line)."""
    m = mode() if enabled else "off"
    if m == "off":
        return _Off()
    if m == "bar":
        return _Bar(total, desc, unit)
    return _Lines(total, desc, unit, interval)
