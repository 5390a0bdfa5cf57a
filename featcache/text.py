"""Numbers as people read them, one rule each for every table, plan and log line."""

from __future__ import annotations


def duration(seconds: float) -> str:
    """A length of time in its natural unit: ``0.42 s``, ``3.5 min``, ``2.25 h`` (costs, wall times)."""
    if seconds >= 3600:
        return f"{seconds / 3600:,.2f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 120 else f"{seconds:.2f} s"


def clock(seconds: float) -> str:
    """A running time as a compact clock: ``42s``, ``4m05s``, ``1h07m`` (progress lines, ETAs)."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def plural(n: int, word: str, many: str | None = None) -> str:
    """'1 error', '2 errors' (``many`` for irregular plurals)."""
    return f"{n} {word if n == 1 else many or word + 's'}"
