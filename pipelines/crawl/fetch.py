"""Fetching: many URLs at once per task (asyncio + aiohttp), each one politely and safely.

Per URL: a lease from the cluster-wide host limiter before every request, streaming reads
that stop at the size cap, redirects followed by hand (bounded, loop-checked, robots-checked;
a redirect to another origin is handed back to the frontier so that origin's robots.txt and
limits apply), retries with exponential backoff on timeouts, connection errors, 429 and 5xx
(Retry-After honoured and shared with every worker through the limiter), none on other 4xx.
"""

from __future__ import annotations

import asyncio
import functools
import random
import ssl
import time
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Callable, Mapping

import aiohttp
import yarl
import pyarrow as pa

from zhchat.config import CrawlConfig

from .limiter import Limiter
from .urls import BadURL, host_of, normalize_url, origin_of

TEXT_TYPES = ("text/html", "text/plain")
_REDIRECTS = (301, 302, 303, 307, 308)

FETCH_SCHEMA = pa.schema([
    ("url", pa.string()),
    ("depth", pa.int32()),
    ("final_url", pa.string()),
    ("status", pa.int32()),
    ("content_type", pa.string()),
    ("body", pa.binary()),
    ("fetched_at", pa.timestamp("ms", tz="UTC")),
    ("attempts", pa.int32()),
    ("error_kind", pa.string()),   # "" on success
    ("message", pa.string()),
    ("redirect_to", pa.string()),  # set when the page redirects to another origin
])


class _Retry(Exception):
    def __init__(self, kind: str, status: int, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.kind, self.status, self.retry_after = kind, status, retry_after


class _Fail(Exception):
    def __init__(self, kind: str, status: int, message: str):
        super().__init__(message)
        self.kind, self.status = kind, status


def retry_after_s(value: str | None) -> float | None:
    """Retry-After as seconds from now: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def _looks_like_html(body: bytes) -> bool:
    head = body[:1024].lstrip().lower()
    return head.startswith((b"<!doctype html", b"<html", b"<head", b"<body")) or b"<html" in head


@functools.lru_cache(maxsize=1)
def _tls_context() -> ssl.SSLContext:
    """Loading the CA bundle costs ~50 ms of CPU; do it once per worker process, not per task."""
    return ssl.create_default_context()


def make_client(cfg: CrawlConfig, max_connections: int) -> aiohttp.ClientSession:
    """aiohttp rather than httpx: its C HTTP parser costs ~0.3 ms of CPU per request against
    httpx's ~1.2 ms (measured on loopback), and on a 2-core box CPU is what caps pages/s.
    Call inside a running event loop."""
    timeout = aiohttp.ClientTimeout(total=None, connect=cfg.connect_timeout_s, sock_read=cfg.read_timeout_s)
    return aiohttp.ClientSession(
        timeout=timeout, headers={"User-Agent": cfg.user_agent},
        connector=aiohttp.TCPConnector(limit=max_connections, ssl=_tls_context()),
    )


class Fetcher:
    """Fetches URLs with one client, one limiter and a robots check (`allowed(url) -> bool`)."""

    def __init__(self, cfg: CrawlConfig, client: aiohttp.ClientSession, limiter: Limiter,
                 allowed: Callable[[str], bool] | None = None, any_text_type: bool = False):
        self.cfg, self.client, self.limiter = cfg, client, limiter
        self.allowed = allowed or (lambda url: True)
        self.any_text_type = any_text_type  # robots.txt is often served with odd types

    async def fetch(self, url: str, depth: int = 0) -> dict:
        """One row of FETCH_SCHEMA; never raises for a bad page."""
        cfg = self.cfg
        attempts = 0
        while True:
            attempts += 1
            try:
                row = await self._attempt(url)
                return _row(url, depth, attempts, **row)
            except _Fail as f:
                return _row(url, depth, attempts, status=f.status, error_kind=f.kind, message=str(f))
            except _Retry as r:
                err = r
            except Exception as e:  # an unforeseen failure stays this URL's problem
                return _row(url, depth, attempts, error_kind="internal", message=f"{type(e).__name__}: {e}")
            if attempts > cfg.max_retries:
                return _row(url, depth, attempts, status=err.status, error_kind=err.kind,
                            message=f"{err} (gave up after {attempts} attempts)")
            wait = err.retry_after if err.retry_after is not None else \
                cfg.backoff_s * 2 ** (attempts - 1) * random.uniform(0.8, 1.2)
            if wait > cfg.max_retry_after_s:
                return _row(url, depth, attempts, status=err.status, error_kind=err.kind,
                            message=f"{err}; asked to wait {wait:.0f}s > max_retry_after_s")
            await asyncio.sleep(wait)

    async def _attempt(self, url: str) -> dict:
        cfg = self.cfg
        chain = [url]
        current = url
        budget = cfg.page_timeout_s  # wall time of the HTTP part; limiter waits do not count
        while True:
            host = host_of(current)
            lease = await self.limiter.acquire(host)
            t0 = time.monotonic()
            try:
                status, headers, body = await asyncio.wait_for(self._get(current), max(0.001, budget))
            except asyncio.TimeoutError:  # also aiohttp's connect/read timeouts
                raise _Retry("timeout", 0, f"no complete response within the timeouts (page_timeout_s="
                             f"{cfg.page_timeout_s}s, read_timeout_s={cfg.read_timeout_s}s) at {current}") from None
            except aiohttp.InvalidURL as e:
                raise _Fail("bad_url", 0, f"{current}: {e}") from None
            except aiohttp.ClientPayloadError as e:
                if "encoding" in str(e) or "decompress" in str(e).lower():
                    raise _Fail("decoding", 0, f"content-encoding could not be decoded: {e}") from None
                raise _Retry("connection", 0, f"{type(e).__name__}: {e}") from None
            except aiohttp.ClientResponseError as e:  # a malformed status line or headers
                raise _Fail("bad_response", getattr(e, "status", 0) or 0, f"{type(e).__name__}: {e}") from None
            except (aiohttp.ClientError, OSError) as e:
                raise _Retry("connection", 0, f"{type(e).__name__}: {e}") from None
            finally:
                self.limiter.release(host, lease)
            budget -= time.monotonic() - t0

            if status in _REDIRECTS:
                location = headers.get("location")
                if not location:
                    raise _Fail("http_status", status, f"{status} redirect without a Location header")
                try:
                    target = normalize_url(location, base=current)
                except BadURL as e:
                    raise _Fail("bad_redirect", status, str(e)) from None
                if target in chain:
                    raise _Fail("redirect_loop", status, " -> ".join(chain + [target]))
                if len(chain) > cfg.max_redirects:
                    raise _Fail("too_many_redirects", status, f"more than {cfg.max_redirects} redirects from {url}")
                if origin_of(target) != origin_of(url):
                    # Another origin: its own robots.txt, scope and dedup apply, so the frontier takes it.
                    return {"final_url": current, "status": status, "redirect_to": target}
                if not self.allowed(target):
                    raise _Fail("robots_disallowed", status, f"redirect target {target} is disallowed by robots.txt")
                chain.append(target)
                current = target
                continue
            if status == 429 or status >= 500:
                wait = retry_after_s(headers.get("retry-after"))
                if wait is not None and status in (429, 503):
                    await self.limiter.pause(host, min(wait, cfg.max_retry_after_s))
                raise _Retry("http_429" if status == 429 else "http_5xx", status, f"HTTP {status} from {current}", wait)
            if status >= 400:
                raise _Fail("http_4xx", status, f"HTTP {status} from {current}")
            if not 200 <= status < 300:
                raise _Fail("http_status", status, f"unexpected HTTP {status} from {current}")
            return {"final_url": current, "status": status, "content_type": headers.get("content-type", ""),
                    "body": body}

    async def _get(self, url: str) -> tuple[int, Mapping[str, str], bytes]:
        cap = self.cfg.max_page_bytes
        # encoded=True: normalize_url already percent-encoded it; yarl must not re-quote.
        async with self.client.get(yarl.URL(url, encoded=True), allow_redirects=False) as r:
            status = r.status
            if not 200 <= status < 300:
                return status, r.headers, b""  # error and redirect bodies are not read
            ctype = r.headers.get("content-type", "")
            mime = ctype.split(";")[0].strip().lower()
            if mime and mime not in TEXT_TYPES and not (self.any_text_type and mime.startswith("text/")):
                r.close()  # drop the connection rather than read a body we do not want
                raise _Fail("content_type", status, f"{mime} is not text/html or text/plain")
            length = r.headers.get("content-length", "")
            if length.isdigit() and int(length) > cap:
                r.close()
                raise _Fail("too_large", status, f"Content-Length {length} > max_page_bytes={cap}")
            buf = bytearray()
            async for chunk in r.content.iter_chunked(1 << 16):
                buf += chunk
                if len(buf) > cap:  # stop reading: the connection is dropped, not drained
                    r.close()
                    raise _Fail("too_large", status, f"body passed max_page_bytes={cap}; stopped reading")
            if not mime and not (self.any_text_type or _looks_like_html(bytes(buf))):
                raise _Fail("content_type", status, "no Content-Type and the body is not HTML")
            return status, r.headers, bytes(buf)


def _row(url: str, depth: int, attempts: int, *, final_url: str = "", status: int = 0, content_type: str = "",
         body: bytes = b"", error_kind: str = "", message: str = "", redirect_to: str = "") -> dict:
    return {"url": url, "depth": depth, "final_url": final_url or url, "status": status,
            "content_type": content_type, "body": body, "fetched_at": datetime.now(timezone.utc),
            "attempts": attempts, "error_kind": error_kind, "message": message[:2000], "redirect_to": redirect_to}


async def fetch_many(rows: list[dict], cfg: CrawlConfig, limiter: Limiter,
                     allowed: Callable[[str], bool] | None = None,
                     then: Callable[[dict], dict] | None = None) -> list[dict]:
    """Fetch rows ({url, depth}) with up to cfg.fetch_concurrency in flight (the limiter still
    decides), in input order. `then` maps each fetched row as soon as it arrives, so CPU work on
    one page overlaps the other fetches instead of waiting for the slowest.

    A fixed set of fetch coroutines pull URLs one after another: a coroutine that finishes a
    page asks for its next lease in the same event-loop turn, which lets the limiter client
    hand its old lease back with that request."""
    out: list[dict | None] = [None] * len(rows)
    todo = iter(range(len(rows)))
    async with make_client(cfg, cfg.fetch_concurrency) as client:
        fetcher = Fetcher(cfg, client, limiter, allowed)

        async def worker() -> None:
            for i in todo:
                row = await fetcher.fetch(rows[i]["url"], int(rows[i].get("depth", 0)))
                out[i] = then(row) if then else row

        await asyncio.gather(*(worker() for _ in range(min(cfg.fetch_concurrency, len(rows)))))
    limiter.close()  # the loop is about to end: no lease may stay out
    return out  # type: ignore[return-value]
