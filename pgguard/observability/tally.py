"""Counters and histograms without a lock, for the per-statement series (metrics.py).

prometheus_client takes a lock in every inc()/observe(); the relay counts and times every
statement, so those series are plain numbers bumped by the event loop thread (the only thread
that touches them) and turned into metric families when /metrics is scraped. setup.py compiles
this module (tally.pxd: extension types, `observe` a C loop), as it runs once per statement.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence

from prometheus_client.utils import floatToGoString

__all__ = ["Tally", "TallyHistogram"]


class Tally:
    """A counter child without a lock: for series only the event loop thread updates."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError("counters can only go up")
        self.value += amount


class TallyHistogram:
    """A histogram without a lock: one bucket count and the sum per observation."""

    __slots__ = ("_counts", "bounds", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(float(b) for b in sorted(bounds))
        # Machine integers, the last one +Inf: compiled, a C array (tally.pxd), so counting
        # makes no int object; 2**63 statements are out of reach.
        self._counts = array("q", bytes(8 * (len(self.bounds) + 1)))
        self.sum = 0.0

    @property
    def counts(self) -> list[int]:
        """The count of each bucket (not cumulative), the last one +Inf."""
        return list(self._counts)

    def observe(self, amount: float) -> None:
        # The first bucket whose upper bound is >= amount (le: bounds are inclusive), else
        # +Inf. A scan, not bisect: compiled it is a C loop over a few doubles, and most
        # statements stop at the first bound.
        i = 0
        for bound in self.bounds:
            if amount <= bound:
                break
            i += 1
        self._counts[i] += 1
        self.sum += amount

    def buckets(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        total = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += n
            out.append((floatToGoString(bound), total))  # type: ignore[no-untyped-call]
        return out
