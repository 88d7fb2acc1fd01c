"""How the application's tables write a number for people, in the terminal and in report sections alike: "–"
where a value does not apply (None, NaN), a driving score with its standard error, a paired difference with its
confidence interval."""
from __future__ import annotations

import math

MISSING = "–"


def missing(value) -> bool:
    """True for None and for what is not a finite number."""
    if value is None:
        return True
    try:
        return not math.isfinite(float(value))
    except (TypeError, ValueError):
        return True


def number(value, fmt: str = "{:.2f}") -> str:
    return MISSING if missing(value) else fmt.format(value)


def mean_se(mean: float, se: float) -> str:
    """A mean ± its standard error, one decimal: "76.3 ± 5.9"."""
    return f"{mean:.1f} ± {number(se, '{:.1f}')}"


def paired_diff(diff: float, low: float, high: float) -> str:
    """A paired difference and its CI, signed: "+5.6 [+1.4, +10.9]"; "–" without one (the reference itself)."""
    return MISSING if missing(diff) else f"{diff:+.1f} [{low:+.1f}, {high:+.1f}]"
