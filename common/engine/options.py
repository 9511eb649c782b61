"""Checking a dict of options against a table of allowed names and value tests (the learned refinements'
``np_merge={...}`` and ``distill={...}``): an unknown name or a bad value is a ValueError naming it."""
from __future__ import annotations

from typing import Callable

__all__ = ["check_options"]


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
