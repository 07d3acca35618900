"""Argument types shared by the command line's subcommands (torch-free, so ``--help`` stays fast).

A value that fails one of these is a usage error: argparse prints ``argument --FLAG: ...`` and exits 2 before any
work starts.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any, Callable

class UsageError(ValueError):
    """An invalid value found after parsing (a check that needs more than one option): exit 2, like argparse's."""


STORAGE_HELP = 'fsspec options as a JSON object, e.g. \'{"client_kwargs": {"endpoint_url": "http://..."}}\''


def json_object(text: str) -> dict[str, Any]:
    """A JSON object (``{...}``): the ``--storage-options`` type."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg} at character {e.pos}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object ({{...}}), got {type(value).__name__}: {text!r}")
    return value


def storage_options(value: Any, flag: str = "--storage-options") -> dict[str, Any]:
    """``args.storage_options`` as a dict: parsed already by :func:`json_object`, or a JSON string (a
    programmatically built namespace). Raises ValueError naming ``flag``."""
    if isinstance(value, dict):
        return value
    try:
        return json_object(value if value is not None else "{}")
    except argparse.ArgumentTypeError as e:
        raise ValueError(f"{flag}: {e}") from None


def add_storage_options(p: argparse.ArgumentParser, help: str = STORAGE_HELP) -> None:
    p.add_argument("--storage-options", type=json_object, default={}, metavar="JSON", help=help)


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = f"int>={minimum}"
    return parse


def float_in(low: float, high: float | None = None, *, low_open: bool = False) -> Callable[[str], float]:
    """A finite float in ``[low, high]`` (``(low, high]`` with ``low_open``; no upper bound for None)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if not math.isfinite(value) or value < low or (low_open and value == low) or \
                (high is not None and value > high):
            bounds = f"{'(' if low_open else '['}{low:g}, {'inf)' if high is None else f'{high:g}]'}"
            raise argparse.ArgumentTypeError(f"must be in {bounds}, got {text}")
        return value

    parse.__name__ = "float"
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)

__all__ = ["STORAGE_HELP", "UsageError", "add_storage_options", "float_in", "int_at_least", "json_object", "non_negative_int",
           "positive_int", "storage_options"]
