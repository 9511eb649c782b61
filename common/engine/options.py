"""Checking a dict of options against a table of allowed names and value tests (the learned refinements'
``np_merge={...}`` and ``distill={...}``): an unknown name or a bad value is a ValueError naming it."""
from __future__ import annotations

import math
from typing import Callable

__all__ = ["check_options", "is_number", "integer", "number"]


def is_number(v) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def integer(minimum: int | None = None) -> tuple[Callable[[object], bool], str]:
    """The table entry of an integer option (not a bool), at least ``minimum`` when given."""
    return ((lambda v: isinstance(v, int) and not isinstance(v, bool) and (minimum is None or v >= minimum)),
            "an integer" + ("" if minimum is None else f" >= {minimum}"))


def number(above: float) -> tuple[Callable[[object], bool], str]:
    """The table entry of a finite number option greater than ``above``."""
    return (lambda v: is_number(v) and v > above), f"a number > {above:g}"


def check_options(opts: dict, options: dict[str, tuple[Callable[[object], bool], str]], what: str) -> dict:
    """``opts`` checked against ``options`` (name -> (test, what the value must be)); returns a copy."""
    if not isinstance(opts, dict):
        raise ValueError(f"{what} options must be a dict, got {type(opts).__name__}")
    for k, v in opts.items():
        if k not in options:
            raise ValueError(f"unknown {what} option {k!r}; choose from {sorted(options)}")
        test, must = options[k]
        if not test(v):
            raise ValueError(f"{what} option {k!r} must be {must}, got {v!r}")
    return dict(opts)
