"""Politeness that holds across the whole cluster: robots.txt rules and one host limiter.

The limiter is ONE named async Ray actor per crawl run. Every fetch, on any worker of any node,
acquires a lease for its host before it sends a request and releases it after the body is
read, so the per-host concurrency and request rate hold for the crawl as a whole, not per
worker. Leases expire (a worker that dies while holding one cannot block a host forever),
which also makes the actor safe to keep alive (detached) across a driver restart; we name
it per run instead, so a rerun never meets a dead run's actor.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from protego import Protego

LIMITER_NAMESPACE = "zhchat"


def limiter_name(crawl_id: str) -> str:
    return f"zhchat-crawl-limiter-{crawl_id}"


def ua_token(user_agent: str) -> str:
    """The product token robots.txt groups are matched against ('zhchat-crawler/0.1 (+…)' -> 'zhchat-crawler')."""
    return user_agent.split("/")[0].split()[0] if user_agent.strip() else "*"


class Robots:
    """robots.txt of one origin. `allow_all` / `deny_all` follow RFC 9309: a missing file
    (4xx) allows everything, an unreachable one (5xx, network errors) disallows everything."""

    def __init__(self, text: str | None = None, *, deny_all: bool = False, user_agent: str = "*"):
        self.deny_all = deny_all
        self.reason = ""  # why everything is denied, for the errors table
        self.token = ua_token(user_agent)
        self._rp = Protego.parse(text) if text else None
        self.text = text or ""

    def allowed(self, url: str) -> bool:
        if self.deny_all:
            return False
        return True if self._rp is None else self._rp.can_fetch(url, self.token)

    def crawl_delay(self) -> float | None:
        if self._rp is None:
            return None
        d = self._rp.crawl_delay(self.token)
        return float(d) if d is not None else None

    def to_state(self) -> dict:
        """Small picklable form to ship to workers (Protego objects are rebuilt there)."""
        return {"text": self.text, "deny_all": self.deny_all}

    @classmethod
    def from_state(cls, s: dict, user_agent: str) -> "Robots":
        return cls(s["text"] or None, deny_all=s["deny_all"], user_agent=user_agent)


@dataclass
class _Host:
    interval: float
    last_start: float = -1e9
    not_before: float = 0.0
    active: dict[int, float] = field(default_factory=dict)  # lease id -> expiry (monotonic)
    cond: asyncio.Condition = field(default_factory=asyncio.Condition)
    start_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    granted: int = 0
    recent: list[float] = field(default_factory=list)     # grant times, for the rate shown


class HostLimiterCore:
    """The limiter's logic, plain asyncio (tested directly; HostLimiter wraps it as an actor).

    acquire(host) waits until fewer than `concurrency` leases are out for the host AND the
    interval since the host's previous start has passed (1/rps or the Crawl-delay, whichever is
    longer), then returns a lease id. A 429/503 with Retry-After pushes the next start back.
    """

    def __init__(self, concurrency: int, rps: float, lease_ttl_s: float):
        self.concurrency = concurrency
        self.interval = 1.0 / rps
        self.lease_ttl_s = lease_ttl_s
        self.hosts: dict[str, _Host] = {}
        self._next_id = 0

    def _host(self, host: str) -> _Host:
        h = self.hosts.get(host)
        if h is None:
            h = self.hosts[host] = _Host(self.interval)
        return h

    def _reap(self, h: _Host, now: float) -> None:
        for lease, expiry in list(h.active.items()):
            if expiry < now:
                del h.active[lease]

    async def acquire(self, host: str) -> int:
        h = self._host(host)
        async with h.cond:
            while True:
                now = time.monotonic()
                self._reap(h, now)
                if len(h.active) < self.concurrency:
                    break
                soonest = min(h.active.values()) - now
                try:
                    await asyncio.wait_for(h.cond.wait(), timeout=max(0.01, soonest))
                except asyncio.TimeoutError:
                    pass
            self._next_id += 1
            lease = self._next_id
            # The slot is held while waiting for the start time: in flight includes scheduled.
            wait_bound = h.interval * (1 + len(h.active)) + max(0.0, h.not_before - now)
            h.active[lease] = now + self.lease_ttl_s + wait_bound
        # Starts are serialised and spaced from the previous *actual* start, so a late wake-up
        # never lets the next one through early.
        async with h.start_lock:
            while True:
                wait = max(h.last_start + h.interval, h.not_before) - time.monotonic()
                if wait <= 0:
                    break
                await asyncio.sleep(wait)
            h.last_start = t = time.monotonic()
            h.active[lease] = t + self.lease_ttl_s
        h.granted += 1
        h.recent.append(t)
        if len(h.recent) > 512:
            del h.recent[:256]
        return lease

    async def release(self, host: str, lease: int) -> None:
        h = self._host(host)
        async with h.cond:
            h.active.pop(lease, None)
            h.cond.notify(1)

    async def set_crawl_delay(self, host: str, delay_s: float) -> float:
        """Slow a host down to its robots.txt Crawl-delay (never speeds it up)."""
        h = self._host(host)
        h.interval = max(self.interval, float(delay_s))
        return h.interval

    async def pause(self, host: str, seconds: float) -> None:
        """The host said 'come back later' (429/503 Retry-After): no new start before then."""
        h = self._host(host)
        h.not_before = max(h.not_before, time.monotonic() + seconds)

    async def stats(self, window_s: float = 5.0) -> dict[str, dict]:
        now = time.monotonic()
        out = {}
        for name, h in self.hosts.items():
            n = sum(1 for t in h.recent if t > now - window_s)
            out[name] = {"granted": h.granted, "in_flight": len(h.active),
                         "rate": n / window_s, "interval_s": h.interval}
        return out


def _actor_class():
    import ray

    @ray.remote(num_cpus=0, max_concurrency=100_000, max_restarts=-1)
    class HostLimiter(HostLimiterCore):
        """Async actor: thousands of waiting acquires cost nothing but a coroutine each."""

        async def ping(self) -> bool:
            return True

    return HostLimiter


def get_or_create_limiter(crawl_id: str, concurrency: int, rps: float, lease_ttl_s: float):
    """The crawl's limiter actor, created on first use and looked up by name afterwards."""
    cls = _actor_class()
    handle = cls.options(name=limiter_name(crawl_id), namespace=LIMITER_NAMESPACE,
                         get_if_exists=True, lifetime=None).remote(concurrency, rps, lease_ttl_s)
    return handle


def lookup_limiter(crawl_id: str):
    """The limiter handle inside a worker (looked up by name once per batch)."""
    import ray

    return ray.get_actor(limiter_name(crawl_id), namespace=LIMITER_NAMESPACE)


def stop_limiter(handle) -> None:
    import ray

    ray.kill(handle)


async def fetch_robots(origins: list[str], cfg, limiter) -> dict[str, Robots]:
    """robots.txt of each origin, fetched concurrently through the host limiter.

    200 -> its rules; 4xx (and unusable answers) -> allow all; 5xx or network failure after the
    usual retries -> disallow all for this run (RFC 9309 2.3.1.4). A cross-origin redirect of
    robots.txt is followed once.
    """
    from .fetch import Fetcher, make_client

    async def one(fetcher: Fetcher, origin: str) -> tuple[str, Robots]:
        row = await fetcher.fetch(f"{origin}/robots.txt")
        if row["redirect_to"]:
            row = await fetcher.fetch(row["redirect_to"])
        if not row["error_kind"] and not row["redirect_to"]:
            return origin, Robots(row["body"].decode("utf-8", "replace"), user_agent=cfg.user_agent)
        if row["error_kind"] in ("http_4xx", "redirect_loop", "too_many_redirects", "bad_redirect",
                                 "content_type", "too_large") or row["redirect_to"]:
            return origin, Robots(None, user_agent=cfg.user_agent)
        denied = Robots(None, deny_all=True, user_agent=cfg.user_agent)
        denied.reason = f"robots.txt unavailable ({row['error_kind']}: {row['message']}); RFC 9309 says disallow all"
        return origin, denied

    async with make_client(cfg, max(4, len(origins))) as client:
        fetcher = Fetcher(cfg, client, limiter, any_text_type=True)
        pairs = await asyncio.gather(*(one(fetcher, o) for o in origins))
    return dict(pairs)
