"""robots.txt: the rules of one origin (Robots) and fetching them for a crawl (fetch_robots),
through the same polite fetcher and host limiter as every page (RFC 9309)."""

from __future__ import annotations

import asyncio

from protego import Protego

from .fetch import Fetcher, make_client


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


# How long a worker may keep a lease for further requests to the same host without asking
# the actor again (see ActorLimiter). Short, so a Retry-After seen elsewhere reaches it soon.


async def fetch_robots(origins: list[str], cfg, limiter) -> dict[str, Robots]:
    """robots.txt of each origin, fetched concurrently through the host limiter.

    200 -> its rules; 4xx (and unusable answers) -> allow all; 5xx or network failure after the
    usual retries -> disallow all for this run (RFC 9309 2.3.1.4). A cross-origin redirect of
    robots.txt is followed once.
    """
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
    limiter.close()
    return dict(pairs)
