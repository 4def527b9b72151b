"""URL normalisation and scope: one spelling per page, so dedup by string is dedup by page."""

from __future__ import annotations

import re
from urllib.parse import quote, urljoin, urlsplit, urlunsplit

SCHEMES = ("http", "https")
_DEFAULT_PORTS = {"http": 80, "https": 443}
# Characters left as they are when re-quoting: RFC 3986 reserved + unreserved + '%'.
_SAFE_PATH = "/:@!$&'()*+,;=-._~%"
_SAFE_QUERY = _SAFE_PATH + "?"
_PCT = re.compile(r"%[0-9a-fA-F]{2}")


class BadURL(ValueError):
    """A link that is not a crawlable http(s) URL; the message says why."""


def _remove_dot_segments(path: str) -> str:
    # RFC 3986 5.2.4, simplified: resolve '.' and '..' without touching empty segments' meaning.
    out: list[str] = []
    for seg in path.split("/"):
        if seg == ".":
            continue
        if seg == "..":
            if len(out) > 1:
                out.pop()
            continue
        out.append(seg)
    result = "/".join(out)
    if path.endswith(("/.", "/..")):
        result += "/"
    return result if result.startswith("/") else "/" + result


def normalize_url(url: str, base: str | None = None) -> str:
    """Absolute, canonical form of `url` (resolved against `base`): lower-case scheme and host,
    no default port, no fragment, dot segments resolved, percent-escapes upper-case, non-ASCII
    escaped as UTF-8. Raises BadURL for other schemes or URLs without a host."""
    url = url.strip()
    if base is not None:
        url = urljoin(base, url)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise BadURL(f"unparsable URL {url!r}: {e}") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise BadURL(f"scheme {scheme or '(none)'!r} is not http or https: {url!r}")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise BadURL(f"no host in {url!r}")
    try:
        host = host.encode("idna").decode("ascii").lower() if not host.isascii() else host.lower()
    except UnicodeError as e:
        raise BadURL(f"bad host name in {url!r}: {e}") from None
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    netloc = host if port in (None, _DEFAULT_PORTS[scheme]) else f"{host}:{port}"
    path = _remove_dot_segments(quote(parts.path or "/", safe=_SAFE_PATH))
    query = quote(parts.query, safe=_SAFE_QUERY)
    path = _PCT.sub(lambda m: m.group(0).upper(), path)
    query = _PCT.sub(lambda m: m.group(0).upper(), query)
    return urlunsplit((scheme, netloc, path, query, ""))


def host_of(url: str) -> str:
    """Host name without port: the unit of politeness (robots.txt is per origin, see origin_of)."""
    return (urlsplit(url).hostname or "").lower()


def origin_of(url: str) -> str:
    p = urlsplit(url)
    return f"{p.scheme}://{p.netloc}"


def in_scope(url: str, allowed: list[str] | tuple[str, ...], exact_hosts: list[str] | tuple[str, ...] = ()) -> bool:
    """True if the URL's host is one of `exact_hosts` or is/under one of the `allowed` domains."""
    host = host_of(url)
    if host in exact_hosts:
        return True
    return any(host == d or host.endswith("." + d) for d in allowed)
