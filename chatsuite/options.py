"""Number options of both programs' command lines, as argparse types (stdlib only).

``whole(minimum, maximum)`` and ``seconds(zero_allowed)`` turn a value that cannot work (out of
range, NaN, infinite, not a number) into a usage error that names the option (exit 2), never
a crash later.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def whole(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number within bounds, or a usage error that says so."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            within = f"from {minimum} to {maximum}" if maximum is not None else f">= {minimum}"
            raise argparse.ArgumentTypeError(f"must be {within}, not {value}")
        return value

    return parse


def seconds(zero_allowed: bool) -> Callable[[str], float]:
    """An argparse type: a finite number >= 0 (``zero_allowed``, where 0 means off) or > 0."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(value) or value < 0 or (value == 0 and not zero_allowed):
            raise argparse.ArgumentTypeError(
                f"must be a number {'>= 0' if zero_allowed else '> 0'}, not {text}")
        return value

    return parse
