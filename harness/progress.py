"""When to draw live progress bars: only on a terminal. Piped into a log (`prunedrive bench | tee log`), a
rich bar prints nothing useful but blank lines; there the phase lines and plain periodic lines speak."""
from __future__ import annotations


def live_bars(enabled: bool = True) -> bool:
    if not enabled:
        return False
    from rich.console import Console

    return Console().is_terminal
