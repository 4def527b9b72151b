"""From a fetched page to text, links and dialogues.

Main text comes from trafilatura (boilerplate removal); links and thread dialogues from
selectolax (lexbor) with the CSS selectors of the config: a post and its replies, a question
and its answers, become the turns of one dialogue row.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from selectolax.lexbor import LexborHTMLParser

from zhchat.config import SelectorConfig

from .urls import BadURL, normalize_url

_WS = re.compile(r"\s+")
# Whitespace between two CJK characters is layout (a line break in the HTML source), not a word gap.
_CJK_GAP = re.compile(r"(?<=[\u3000-\u303f\u3400-\u9fff\uf900-\ufaff\uff00-\uffef])\s+(?=[\u3000-\u303f\u3400-\u9fff\uf900-\ufaff\uff00-\uffef])")


def clean_text(s: str) -> str:
    return _WS.sub(" ", _CJK_GAP.sub("", s)).strip()


@dataclass
class Links:
    urls: list[str] = field(default_factory=list)  # normalised http(s), page order, no repeats
    bad_scheme: int = 0                             # mailto:, ftp:, javascript: …


def page_links(tree: LexborHTMLParser, base_url: str) -> Links:
    """Every <a href> of the page, resolved against <base href> if there is one."""
    base = tree.css_first("base[href]")
    if base is not None:
        try:
            base_url = normalize_url(base.attributes.get("href") or "", base=base_url)
        except BadURL:
            pass
    out = Links()
    seen: set[str] = set()
    for a in tree.css("a[href]"):
        href = (a.attributes.get("href") or "").strip()
        if not href or href.startswith("#"):
            continue
        try:
            url = normalize_url(href, base=base_url)
        except BadURL:
            out.bad_scheme += 1
            continue
        if url not in seen:
            seen.add(url)
            out.urls.append(url)
    return out


def meta_robots(tree: LexborHTMLParser) -> set[str]:
    """Directives of <meta name="robots"> (noindex, nofollow, none)."""
    out: set[str] = set()
    for m in tree.css("meta[name]"):
        if (m.attributes.get("name") or "").strip().lower() in ("robots", "zhchat-crawler"):
            out |= {d.strip().lower() for d in (m.attributes.get("content") or "").split(",")}
    if "none" in out:
        out |= {"noindex", "nofollow"}
    return out


def main_text(html: str, url: str, fast: bool = True) -> str:
    import trafilatura

    text = trafilatura.extract(html, url=url, include_comments=False, include_tables=True, fast=fast,
                               include_links=False, include_images=False, deduplicate=False)
    return (text or "").strip()


def thread_turns(tree: LexborHTMLParser, url: str, selectors: list[SelectorConfig]) -> list[str] | None:
    """Turns of the first selector set whose url_pattern matches and that finds a post and at
    least one reply; None when no set matches (the page is then text, not a dialogue)."""
    for sel in selectors:
        if not re.search(sel.url_pattern, url):
            continue
        post = tree.css_first(sel.post)
        if post is None:
            continue
        first = clean_text(post.text(separator=" "))
        replies = [clean_text(n.text(separator=" ")) for n in tree.css(sel.replies)]
        turns = [t for t in [first, *replies] if t]
        if len(turns) >= 2:
            return turns
    return None
