"""The crawl's host limiter: one named async Ray actor per crawl run, and its clients.

Every fetch, on any worker of any node, acquires a lease for its host before it sends a
request and releases it after the body is read, so the per-host concurrency and request
rate hold for the crawl as a whole, not per worker. Leases expire (a worker that dies while
holding one cannot block a host forever), which also makes the actor safe to keep alive
(detached) across a driver restart; we name it per run instead, so a rerun never meets a
dead run's actor. The client side (ActorLimiter, LocalLimiter) lives here beside the actor.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import time
import uuid
from dataclasses import dataclass, field
from typing import Protocol

LIMITER_NAMESPACE = "zhchat"


def limiter_name(crawl_id: str) -> str:
    return f"zhchat-crawl-limiter-{crawl_id}"


REUSE_S = 1.0


@dataclass
class _Host:
    interval: float
    concurrency: int
    last_start: float = -1e9
    not_before: float = 0.0
    active: dict[int, float] = field(default_factory=dict)  # lease id -> expiry (monotonic)
    queue: collections.deque = field(default_factory=collections.deque)  # futures waiting, FIFO
    start_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    granted: int = 0
    recent: list[float] = field(default_factory=list)     # grant times, for the rate shown


class HostLimiterCore:
    """The limiter's logic, plain asyncio (tested directly; HostLimiter wraps it as an actor).

    acquire(host) waits until fewer than `concurrency` leases are out for the host AND the
    interval since the host's previous start has passed (1/rps or the Crawl-delay, whichever is
    longer), then returns a lease id. A 429/503 with Retry-After pushes the next start back.
    Waiters are served first come, first served: a released slot is handed to the oldest one.

    lease(host) is the same for remote clients that keep a lease for REUSE_S for further requests
    to the host, spacing their own starts by concurrency x interval: N leases then start at most
    1/interval requests per second together, as N slots spaced centrally would. A client that
    stops before its lease requests are answered names them in forget(), so no lease leaks.
    """

    def __init__(self, concurrency: int, rps: float, lease_ttl_s: float):
        self.concurrency = concurrency
        self.interval = 1.0 / rps
        self.lease_ttl_s = lease_ttl_s
        self.hosts: dict[str, _Host] = {}
        self._next_id = 0
        self._tickets: dict = {}        # lease request ticket -> waiting future, then (host, lease)
        self._lease_ticket: dict = {}   # lease -> its ticket, until the lease comes back

    def _host(self, host: str) -> _Host:
        h = self.hosts.get(host)
        if h is None:
            h = self.hosts[host] = _Host(self.interval, self.concurrency)
        return h

    def _reap(self, h: _Host, now: float) -> None:
        """Leases past their expiry belong to workers that died holding them."""
        for lease, expiry in list(h.active.items()):
            if expiry < now:
                self._forget_lease(lease)
                del h.active[lease]

    def _dispatch(self, h: _Host) -> None:
        """Hand free slots to the oldest waiters."""
        now = time.monotonic()
        while h.queue and len(h.active) < h.concurrency:
            fut = h.queue.popleft()
            if fut.done():  # its caller was cancelled
                continue
            self._next_id += 1
            # The slot is held while waiting for the start time: in flight includes scheduled.
            wait_bound = h.interval * (1 + len(h.active)) + max(0.0, h.not_before - now)
            h.active[self._next_id] = now + self.lease_ttl_s + wait_bound
            fut.set_result(self._next_id)

    def _drop(self, h: _Host, lease: int) -> None:
        self._forget_lease(lease)
        if h.active.pop(lease, None) is not None:
            self._dispatch(h)

    def _forget_lease(self, lease: int) -> None:
        ticket = self._lease_ticket.pop(lease, None)
        if ticket is not None:
            self._tickets.pop(ticket, None)

    async def acquire(self, host: str, released: list[tuple] | tuple = (), ticket=None) -> int:
        """`released`: leases the caller is done with, handed back before it waits (one call
        instead of a release and an acquire)."""
        self._release_all(released)
        h = self._host(host)
        fut = asyncio.get_running_loop().create_future()
        h.queue.append(fut)
        if ticket is not None:
            self._tickets[ticket] = fut
        try:
            while not fut.done():
                now = time.monotonic()
                self._reap(h, now)
                self._dispatch(h)
                if fut.done():
                    break
                # Wake at the soonest lease expiry, in case its holder died.
                soonest = min(h.active.values()) - now
                try:
                    await asyncio.wait_for(asyncio.shield(fut), timeout=max(0.01, soonest))
                except asyncio.TimeoutError:
                    pass
            lease = fut.result()
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self._drop(h, fut.result())
            fut.cancel()
            raise
        if ticket is not None:
            if self._tickets.get(ticket) is not fut:
                self._drop(h, lease)  # forgotten while the grant was on its way: nobody will use it
                return lease
            self._tickets[ticket] = (host, lease)
            self._lease_ticket[lease] = ticket
        try:
            # Starts are serialised and spaced from the previous *actual* start, so a late
            # wake-up never lets the next one through early.
            async with h.start_lock:
                while True:
                    wait = max(h.last_start + h.interval, h.not_before) - time.monotonic()
                    if wait <= 0:
                        break
                    await asyncio.sleep(wait)
                h.last_start = t = time.monotonic()
                if lease in h.active:
                    h.active[lease] = t + self.lease_ttl_s + REUSE_S
        except asyncio.CancelledError:
            self._drop(h, lease)
            raise
        if ticket is None:  # a ticketed client reports its requests when it hands the lease back
            self._count(h, 1, t)
        return lease

    @staticmethod
    def _count(h: _Host, n: int, t: float) -> None:
        h.granted += n
        h.recent.extend([t] * n)
        if len(h.recent) > 512:
            del h.recent[:-256]

    async def release(self, host: str, lease: int) -> None:
        self._drop(self._host(host), lease)

    async def lease(self, host: str, released: list[tuple] | tuple = (), ticket=None) -> tuple[int, float, float, int]:
        """acquire() for a client that may reuse the lease: (lease id, the spacing its own
        starts must keep, how long it may keep reusing it, the host's concurrency)."""
        lease = await self.acquire(host, released, ticket)
        h = self._host(host)
        return lease, h.interval * h.concurrency, REUSE_S, h.concurrency

    async def release_many(self, leases: list[tuple]) -> None:
        self._release_all(leases)

    def _release_all(self, leases: list[tuple] | tuple) -> None:
        """(host, lease) or, from a ticketed client, (host, lease, requests made with it,
        seconds since the last of them started) for each lease handed back. The client's
        starts count as the host's: the next one is spaced from its last (a message's delay
        only makes that later, never earlier)."""
        now = time.monotonic()
        for host, lease, *reuse in leases:
            h = self._host(host)
            if reuse and reuse[0]:
                self._count(h, reuse[0], now)
            if len(reuse) > 1:
                h.last_start = max(h.last_start, now - reuse[1])
            self._drop(h, lease)

    async def forget(self, tickets: list) -> None:
        """The client is gone before these lease requests were answered: withdraw the waiting
        ones and take back the leases already granted."""
        for ticket in tickets:
            entry = self._tickets.pop(ticket, None)
            if isinstance(entry, asyncio.Future):
                # Still waiting: withdraw it. Already granted but not resumed: acquire() sees the
                # ticket gone and takes the lease back itself.
                entry.cancel()
            elif entry is not None:
                host, lease = entry
                self._drop(self._host(host), lease)

    async def set_crawl_delay(self, host: str, delay_s: float) -> float:
        """Slow a host down to its robots.txt Crawl-delay (never speeds it up): one request
        at a time, starts at least the delay apart."""
        h = self._host(host)
        h.interval = max(self.interval, float(delay_s))
        h.concurrency = 1
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


@functools.lru_cache(maxsize=8)
def lookup_limiter(crawl_id: str):
    """The limiter handle inside a worker, looked up by name once per process and crawl run
    (a GCS round trip per task otherwise); the actor restarts under the same handle."""
    import ray

    return ray.get_actor(limiter_name(crawl_id), namespace=LIMITER_NAMESPACE)


def stop_limiter(handle) -> None:
    import ray

    ray.kill(handle)


class Limiter(Protocol):
    async def acquire(self, host: str) -> int: ...
    def release(self, host: str, lease: int) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...
    async def pause(self, host: str, seconds: float) -> None: ...


@dataclass
class _Held:
    host: str
    spacing: float       # this lease's own starts stay this far apart (concurrency x interval)
    reuse_until: float
    last_start: float
    uses: int = 0        # requests started with it


class ActorLimiter:
    """Client side of the HostLimiter actor, one per event loop.

    Every hand-over of a lease through the actor costs two messages, and on a busy machine
    those add up to a sizeable share of a 50 ms request. So a lease released here goes straight
    to a coroutine of this process waiting for the same host, if there is one, with no call at
    all (keeping the lease's own start spacing); otherwise it goes back to the actor at the end
    of the event-loop turn, in one fire-and-forget call or riding on the next request for a
    lease. A lease is passed on like this for at most REUSE_S and never after a Retry-After, so
    the actor's limits and pauses reach every worker quickly, and other workers get their turn."""

    def __init__(self, handle):
        self.h = handle
        self._held: dict[int, _Held] = {}
        self._waiting: dict[str, collections.deque[asyncio.Future]] = collections.defaultdict(collections.deque)
        self._asking: collections.Counter[str] = collections.Counter()  # lease requests in flight
        self._cap: dict[str, int] = {}  # the host's concurrency, as the actor last said
        self._done: list[tuple[str, int, int, float]] = []  # host, lease, requests, last start
        self._flush: asyncio.Handle | None = None
        self._tasks: set[asyncio.Task] = set()
        self._tickets: set[tuple[str, int]] = set()  # lease requests not answered yet
        self._client_id = uuid.uuid4().hex[:12]
        self._next_ticket = 0

    async def acquire(self, host: str) -> int:
        fut = asyncio.get_running_loop().create_future()
        waiting = self._waiting[host]
        waiting.append(fut)
        self._top_up(host)
        lease = await fut
        held = self._held[lease]
        wait = held.last_start + held.spacing - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        held.last_start = time.monotonic()
        held.uses += 1
        return lease

    def _top_up(self, host: str) -> None:
        """One lease request per waiting coroutine, but never more than the host's concurrency
        (learnt from the first answer): more would only queue at the actor and spread the host's
        leases thinly over many workers instead of letting each pass its own on."""
        want = min(len(self._waiting[host]), self._cap.get(host, 1))
        while self._asking[host] < want:
            self._asking[host] += 1
            task = asyncio.get_running_loop().create_task(self._ask(host))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _ask(self, host: str) -> None:
        done, self._done = self._sent_back(), []
        self._next_ticket += 1
        ticket = (self._client_id, self._next_ticket)
        self._tickets.add(ticket)
        try:
            lease, spacing, reuse_s, self._cap[host] = await self.h.lease.remote(host, done, ticket)
        finally:
            self._asking[host] -= 1
        if ticket not in self._tickets:
            return  # forgotten by close(): the actor takes this lease back itself
        self._tickets.discard(ticket)
        now = time.monotonic()
        self._held[lease] = _Held(host, spacing, now + reuse_s, now - spacing)
        self._hand_over(host, lease, fresh=True)
        self._top_up(host)

    def _hand_over(self, host: str, lease: int, fresh: bool = False) -> None:
        held = self._held[lease]
        waiting = self._waiting[host]
        while waiting and (fresh or time.monotonic() < held.reuse_until):
            fut = waiting.popleft()
            if not fut.done():  # a waiter may have been cancelled
                fut.set_result(lease)
                return
        held = self._held.pop(lease)
        self._done.append((host, lease, held.uses, held.last_start))  # the actor counts requests from this
        if self._flush is None:
            self._flush = asyncio.get_running_loop().call_soon(self.flush)

    def release(self, host: str, lease: int) -> None:
        self._hand_over(host, lease)

    def close(self) -> None:
        """Before the event loop ends: withdraw unanswered lease requests (the coroutines that
        wanted them were served by hand-overs) and send back what is left."""
        if self._tickets:
            self.h.forget.remote(sorted(self._tickets))
            self._tickets.clear()
        self.flush()

    def flush(self) -> None:
        """Send every lease given back in this turn that no lease request took along."""
        self._flush = None
        if self._done:
            done, self._done = self._sent_back(), []
            self.h.release_many.remote(done)

    def _sent_back(self) -> list[tuple[str, int, int, float]]:
        """The leases given back, each with how long ago its last request started: the actor
        spaces the host's next start from that one (its own clock may be another node's), so
        a Crawl-delay holds across a hand-back too."""
        now = time.monotonic()
        return [(host, lease, uses, max(0.0, now - last)) for host, lease, uses, last in self._done]

    async def pause(self, host: str, seconds: float) -> None:
        for held in self._held.values():
            if held.host == host:
                held.reuse_until = 0.0  # the host said slow down: every lease goes back
        await self.h.pause.remote(host, seconds)


class LocalLimiter:
    """The same limiter in-process (robots fetches without Ray, unit tests)."""

    def __init__(self, core):
        self.core = core
        self._tasks: set[asyncio.Task] = set()

    async def acquire(self, host: str) -> int:
        return await self.core.acquire(host)

    def release(self, host: str, lease: int) -> None:
        t = asyncio.get_running_loop().create_task(self.core.release(host, lease))
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    def flush(self) -> None:
        pass  # releases are already tasks on this loop

    close = flush

    async def pause(self, host: str, seconds: float) -> None:
        await self.core.pause(host, seconds)
