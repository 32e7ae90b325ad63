"""Experts on demand: an LRU of at most `max_experts` models, shared safely between threads.

Routers are small and always loaded; experts are not, so a 32-expert mixture serves from the
memory of a few experts. A reviewer's objection to the paper (reloading experts costs latency) is
what `benchmarks/bench_serve.py` measures.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

from smalltalk.model import LM

DEFAULT_MAX_EXPERTS = 2


class ExpertCache:
    """Expert e, read by `load(e)` on first use and kept until `max_experts` others are newer."""

    def __init__(self, load: Callable[[int], LM], max_experts: int = DEFAULT_MAX_EXPERTS):
        if max_experts < 1:
            raise ValueError(f"max_experts must be at least 1, got {max_experts}")
        self.max_experts = max_experts
        self._load = load
        self._models: OrderedDict[int, LM] = OrderedDict()  # least recently used first
        # Threads serving one mixture share the LRU: checking for room, evicting and loading
        # happen under one lock, or two loads at once could both find room for one.
        self._lock = threading.RLock()
        self.loads: list[int] = []  # every expert read from disk, in order

    @property
    def loaded(self) -> list[int]:
        """Experts in memory, least recently used first."""
        with self._lock:
            return list(self._models)

    def get(self, e: int) -> LM:
        """Expert e. Loading one more than `max_experts` first drops the least recently used, so
        at most `max_experts` are ever in memory at once."""
        with self._lock:
            if e in self._models:
                self._models.move_to_end(e)
                return self._models[e]
            while len(self._models) >= self.max_experts:
                self._models.popitem(last=False)
            self._models[e] = self._load(e)
            self.loads.append(e)
            return self._models[e]
