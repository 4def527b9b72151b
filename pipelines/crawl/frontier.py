"""The frontier: URLs still to fetch, breadth-first, each URL once."""

from __future__ import annotations

from typing import Iterable


class Frontier:
    def __init__(self, max_depth: int, done: Iterable[str] = ()):
        self.max_depth = max_depth
        self.done: set[str] = set(done)       # fetched, failed or skipped (URLs and redirect finals)
        self.in_flight: set[str] = set()
        self.pending: dict[str, int] = {}     # url -> smallest depth seen

    def add(self, url: str, depth: int) -> bool:
        if depth > self.max_depth or url in self.done or url in self.in_flight:
            return False
        if self.pending.get(url, depth + 1) <= depth:
            return False
        self.pending[url] = depth
        return True

    def take(self, n: int) -> list[tuple[str, int]]:
        """Up to n URLs, shallowest first; they stay 'in flight' until finish() is called."""
        batch = sorted(self.pending.items(), key=lambda kv: kv[1])[:n]
        for url, _ in batch:
            del self.pending[url]
            self.in_flight.add(url)
        return batch

    def finish(self, *urls: str) -> None:
        for u in urls:
            if u:
                self.in_flight.discard(u)
                self.done.add(u)
                self.pending.pop(u, None)

    def __len__(self) -> int:
        return len(self.pending)
