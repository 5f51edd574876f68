"""time.monotonic(), as the compiled _clock.pyx provides it (CLOCK_MONOTONIC)."""

from time import monotonic

__all__ = ["monotonic"]
