"""Capped exponential backoff with full jitter."""

from __future__ import annotations

import random


class Backoff:
    """Delays of ``initial_s * 2**n``, capped at ``max_s``, each drawn from [delay/2, delay].

    Half jitter keeps a floor under the delay, so a failing peer is never hammered,
    while spreading the retries of many gates that lost the network together.
    """

    def __init__(self, *, initial_s: float = 0.5, max_s: float = 30.0) -> None:
        if initial_s <= 0 or max_s < initial_s:
            raise ValueError(f"invalid backoff: initial_s={initial_s}, max_s={max_s}")
        self.initial_s = initial_s
        self.max_s = max_s
        self.failures = 0

    def next_delay(self) -> float:
        """Count one more failure and return how long to wait before the next try, in seconds."""
        ceiling = min(self.max_s, self.initial_s * (2 ** min(self.failures, 32)))
        self.failures += 1
        return random.uniform(ceiling / 2, ceiling)  # noqa: S311 - jitter, not cryptography

    def reset(self) -> None:
        self.failures = 0
