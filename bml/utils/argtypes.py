"""argparse `type=` validators for numeric flags: a bad value stops at parse time, its message
giving the allowed range, instead of training on it, crashing later or giving wrong advice.

    parser.add_argument("--lr", type=number(minimum=0), ...)
    parser.add_argument("--n_queries", type=integer(minimum=1), ...)
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

MIN_IMAGE_SIZE = 16
"""The smallest input whose feature map survives the four stride-2 stages of ResNet-12 and ResNet-18."""


def _range_text(minimum: float | None, maximum: float | None, above_minimum: bool, below_maximum: bool) -> str:
    parts = []
    if minimum is not None:
        parts.append(f"{'>' if above_minimum else '>='} {minimum:g}")
    if maximum is not None:
        parts.append(f"{'<' if below_maximum else '<='} {maximum:g}")
    return " and ".join(parts) or "finite"


def _validator(convert: Callable[[str], float], kind: str, minimum: float | None, maximum: float | None,
               above_minimum: bool, below_maximum: bool) -> Callable[[str], float]:
    allowed = _range_text(minimum, maximum, above_minimum, below_maximum)

    def parse(text: str) -> float:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind} {allowed}, got {text!r}") from None
        too_low = minimum is not None and (value <= minimum if above_minimum else value < minimum)
        too_high = maximum is not None and (value >= maximum if below_maximum else value > maximum)
        if not math.isfinite(value) or too_low or too_high:
            raise argparse.ArgumentTypeError(f"expected {kind} {allowed}, got {text!r}")
        return value

    parse.__name__ = kind.split()[-1]   # argparse names the type in its own messages
    return parse


def integer(minimum: int | None = None, maximum: int | None = None) -> Callable[[str], int]:
    """An integer in [minimum, maximum] (either bound optional)."""
    return _validator(int, "an integer", minimum, maximum, False, False)


def number(minimum: float | None = None, maximum: float | None = None, above_minimum: bool = False,
           below_maximum: bool = False) -> Callable[[str], float]:
    """A finite float in [minimum, maximum]; `above_minimum`/`below_maximum` exclude the bound itself."""
    return _validator(float, "a number", minimum, maximum, above_minimum, below_maximum)


def weight_values(text: str) -> tuple[float, ...]:
    """'2_1_0.5' -> (2.0, 1.0, 0.5), the numbers of a '_'-joined weights text; () when one is not a number."""
    try:
        return tuple(float(part) for part in str(text).split("_"))
    except ValueError:
        return ()


def loss_weights(text: str) -> str:
    """'2_1_0.5': three finite, non-negative loss weights (global_local_mutual), not all zero; kept as text
    (the run folder's name records it)."""
    weights = weight_values(text)
    if len(weights) != 3 or not all(math.isfinite(w) and w >= 0 for w in weights) or not any(weights):
        raise argparse.ArgumentTypeError(f"expected three numbers >= 0 joined by '_' (global_local_mutual), not all "
                                         f"0, e.g. 2_1_0.5; got {text!r}")
    return text


image_size = integer(minimum=MIN_IMAGE_SIZE)
positive_int = integer(minimum=1)
non_negative_int = integer(minimum=0)
