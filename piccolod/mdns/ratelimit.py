"""
A per-source token bucket with bounded memory.

Each source (an IP address) may send ``rate`` packets a second on average
with bursts of up to ``burst``.  At most ``max_sources`` buckets are kept; the
least recently seen is forgotten first, which only ever makes the limiter
more lenient toward that source (a fresh bucket is full), never stricter.
"""

from __future__ import annotations

from collections import OrderedDict

import attrs
from twisted.internet.interfaces import IReactorTime

from piccolod.kernel.aio import provides

__all__ = ["RateLimiter"]


@attrs.define(eq=False)
class RateLimiter:
    """
    @ivar rate: tokens added per second; ``0`` or less disables limiting.
    @ivar burst: bucket size (``rate`` when smaller than 1).
    """

    clock: IReactorTime = attrs.field(validator=provides(IReactorTime))
    rate: float
    burst: float
    max_sources: int = 4096
    _buckets: OrderedDict[str, tuple[float, float]] = attrs.field(init=False, factory=OrderedDict)

    def __attrs_post_init__(self) -> None:
        if self.burst < 1:
            self.burst = max(1.0, self.rate)

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def allow(self, source: str) -> bool:
        """Take one token for ``source``; False when its bucket is empty."""
        if self.rate <= 0:
            return True
        now = self.clock.seconds()
        entry = self._buckets.pop(source, None)
        if entry is None:
            tokens = self.burst
        else:
            tokens, last = entry
            tokens = min(self.burst, tokens + max(0.0, now - last) * self.rate)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets[source] = (tokens, now)
        while len(self._buckets) > self.max_sources:
            self._buckets.popitem(last=False)
        return allowed

    def sources(self) -> int:
        """How many sources are tracked."""
        return len(self._buckets)
