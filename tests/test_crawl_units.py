"""Crawler pieces without Ray: URLs, charsets, extraction, the limiter's logic, and the fetcher
against a real HTTP server on 127.0.0.1 (redirects, caps, timeouts, retries)."""

from __future__ import annotations

import asyncio
import time

import pytest

from crawl_site import Reply, SiteServer, html_page
from pipelines.crawl.decode import canonical, decode_body
from pipelines.crawl.extract import page_links, thread_turns
from pipelines.crawl.fetch import Fetcher, make_client, retry_after_s
from pipelines.crawl.limiter import HostLimiterCore, LocalLimiter
from pipelines.crawl.frontier import Frontier
from pipelines.crawl.robots import Robots
from pipelines.crawl.urls import BadURL, in_scope, normalize_url
from zhchat.config import CrawlConfig, SelectorConfig

ZH = "我们今天去公园散步，天气很好。北京的秋天特别美，上海的小笼包很好吃。你吃饭了吗？还没有，一起去吃火锅吧。"
TW = "我們今天去公園散步，天氣很好。臺北的秋天特別美，小籠包很好吃。你吃飯了嗎？還沒有，一起去吃火鍋吧。"


def _doc(text: str, meta: str | None) -> str:
    nav = "".join(f'<li><a href="/p/{i}.html">link {i}</a></li>' for i in range(20))
    return html_page("t", f"<ul>{nav}</ul><div><p>{text}</p></div>", meta=meta)


# ---- output -------------------------------------------------------------------------------

def test_two_runs_in_one_second_never_share_a_part_name(tmp_path):
    """A resume started right after a short crawl (same process, same second) once reused the
    first run's part names and overwrote its pages, so a third run fetched them again."""
    from pipelines.crawl.output import CrawlStore

    def page(url):
        return {"url": url, "final_url": url, "depth": 0, "status": 200, "outcome": "ok",
                "content_type": "text/html", "charset": "utf-8", "charset_declared": "utf-8",
                "charset_mismatch": False, "fetched_at": None, "bytes": 1, "text": "x", "links": []}

    a, b = CrawlStore(str(tmp_path)), CrawlStore(str(tmp_path))
    a.write_batch([page("http://h.cn/1")], [], [])
    b.write_batch([page("http://h.cn/2")], [], [])
    assert CrawlStore(str(tmp_path)).load().done == {"http://h.cn/1", "http://h.cn/2"}


# ---- URLs -----------------------------------------------------------------------------------

def test_normalize_url():
    assert normalize_url("HTTP://Example.COM:80/a/./b/../c?x=1#frag") == "http://example.com/a/c?x=1"
    assert normalize_url("https://example.com") == "https://example.com/"
    assert normalize_url("../d", base="http://h.cn/a/b/c") == "http://h.cn/a/d"
    assert normalize_url("/路径?q=中文", base="http://h.cn/") == "http://h.cn/%E8%B7%AF%E5%BE%84?q=%E4%B8%AD%E6%96%87"
    assert normalize_url("http://h.cn/x/%e4%bd%a0") == "http://h.cn/x/%E4%BD%A0"
    assert normalize_url("http://h.cn:8080/") == "http://h.cn:8080/"
    for bad in ["mailto:a@b.cn", "ftp://h.cn/f", "javascript:void(0)", "http://", "data:text/html,hi"]:
        with pytest.raises(BadURL):
            normalize_url(bad)


def test_scope():
    assert in_scope("http://bbs.example.cn/x", ["example.cn"])
    assert not in_scope("http://example.cn.evil.com/x", ["example.cn"])
    assert in_scope("http://127.0.0.1:9/x", [], ["127.0.0.1"])
    assert not in_scope("http://127.0.0.2:9/x", [], ["127.0.0.1"])
    assert not in_scope("http://localhost:9/x", [], ["127.0.0.1"])


def test_frontier_breadth_first_and_once():
    f = Frontier(max_depth=2)
    assert f.add("http://a/1", 1) and f.add("http://a/0", 0)
    assert not f.add("http://a/1", 2)          # already queued shallower
    assert not f.add("http://a/deep", 3)       # past max_depth
    assert f.take(1) == [("http://a/0", 0)]
    assert not f.add("http://a/0", 0)          # in flight
    f.finish("http://a/0", "http://a/0-final")
    assert not f.add("http://a/0-final", 1)    # a redirect's final URL counts as fetched
    assert len(f) == 1


# ---- charsets -------------------------------------------------------------------------------

@pytest.mark.parametrize("codec,text,header,meta,expect", [
    ("utf-8", ZH, "text/html; charset=utf-8", None, "utf-8"),
    ("gbk", ZH, "text/html; charset=GBK", None, "gb18030"),
    ("gbk", ZH, "text/html", "gb2312", "gb18030"),
    ("gb18030", ZH + "𠀀", "text/html", "GB18030", "gb18030"),
    ("big5", TW, "text/html", "big5", "big5hkscs"),
    ("gbk", ZH, "text/html", None, "gb18030"),          # nothing declared: detected
    ("big5", TW, "text/html", None, "big5hkscs"),
    ("utf-8", ZH, "text/html", None, "utf-8"),
])
def test_decode_correct_text(codec, text, header, meta, expect):
    d = decode_body(_doc(text, meta).encode(codec), header)
    assert text in d.text
    assert d.charset == expect
    assert not d.mismatch


def test_gb2312_declaration_decodes_gbk_characters():
    # 镕 is in GBK but not in GB2312: pages labelled gb2312 use it anyway.
    body = _doc("朱镕基" + ZH, "gb2312").encode("gbk")
    d = decode_body(body, "text/html")
    assert "朱镕基" in d.text and d.charset == "gb18030" and not d.mismatch


@pytest.mark.parametrize("codec,text,declared", [
    ("gbk", ZH, "utf-8"),          # strict decode fails
    ("utf-8", ZH, "gbk"),          # GB18030 decodes UTF-8 bytes into mojibake without error
    ("big5", TW, "gbk"),           # same: declared GBK, served Big5
    ("gbk", ZH, "iso-8859-1"),     # a server default Latin-1 header on a Chinese page
])
def test_wrong_declared_charset_is_detected(codec, text, declared):
    d = decode_body(_doc(text, None).encode(codec), f"text/html; charset={declared}")
    assert text in d.text, d.text[-200:]
    assert d.mismatch and d.declared == declared
    assert canonical(d.charset) != canonical(declared)


def test_header_wins_over_meta_but_is_checked():
    body = _doc(ZH, "utf-8").encode("gbk")     # meta lies, header is right
    d = decode_body(body, "text/html; charset=gbk")
    assert ZH in d.text and not d.mismatch and d.declared == "gbk"


# ---- extraction -----------------------------------------------------------------------------

def test_links_and_thread_turns():
    from selectolax.lexbor import LexborHTMLParser

    html = """<html><head><base href="http://h.cn/bbs/"></head><body>
      <a href="t/1.html#r2">t</a><a href="t/1.html">same</a><a href="mailto:x@h.cn">m</a>
      <a href="ftp://h.cn/f">f</a><a href="javascript:void(0)">j</a><a href="#top">top</a>
      <div class="post">楼主：今天
      天气怎么样？</div><div class="reply">一楼：很好。</div><div class="reply"> </div><div class="reply">二楼：下雨了。</div>
    </body></html>"""
    tree = LexborHTMLParser(html)
    links = page_links(tree, "http://h.cn/index.html")
    assert links.urls == ["http://h.cn/bbs/t/1.html"]
    assert links.bad_scheme == 3
    sel = [SelectorConfig(url_pattern=r"/nothing/", post="div.x", replies="div.y"),
           SelectorConfig(url_pattern=r"/bbs/", post="div.post", replies="div.reply")]
    assert thread_turns(tree, "http://h.cn/bbs/t/1.html", sel) == ["楼主：今天天气怎么样？", "一楼：很好。", "二楼：下雨了。"]
    assert thread_turns(tree, "http://h.cn/other", sel) is None


def test_selector_config_errors_name_the_field():
    with pytest.raises(ValueError, match="not a valid CSS selector"):
        SelectorConfig(post="div[", replies="p")
    with pytest.raises(ValueError, match="not a valid regex"):
        SelectorConfig(url_pattern="(", post="div", replies="p")


def test_robots_rules():
    r = Robots("User-agent: *\nDisallow: /private/\nCrawl-delay: 1.5\n", user_agent="zhchat-crawler/0.1 (+x)")
    assert r.allowed("http://h/a") and not r.allowed("http://h/private/x")
    assert r.crawl_delay() == 1.5
    assert Robots(None).allowed("http://h/private/x")
    assert not Robots(None, deny_all=True).allowed("http://h/a")


def test_retry_after():
    assert retry_after_s("3") == 3.0
    assert retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    assert retry_after_s("soon") is None


# ---- the limiter's logic --------------------------------------------------------------------

def test_limiter_core_concurrency_and_spacing():
    async def main():
        core = HostLimiterCore(concurrency=2, rps=20, lease_ttl_s=10)
        active, peak, starts = 0, 0, []

        async def job():
            nonlocal active, peak
            lease = await core.acquire("h")
            starts.append(time.monotonic())
            active += 1
            peak = max(peak, active)
            await asyncio.sleep(0.08)
            active -= 1
            await core.release("h", lease)

        await asyncio.gather(*(job() for _ in range(10)))
        return peak, starts

    peak, starts = asyncio.run(main())
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert peak == 2
    assert min(gaps) >= 0.045  # 1/20 s apart (timer slack allowed)


def test_limiter_core_expires_lost_leases():
    async def main():
        core = HostLimiterCore(concurrency=1, rps=1000, lease_ttl_s=0.2)
        await core.acquire("h")               # a worker that died holding its lease
        t = time.monotonic()
        await core.acquire("h")
        return time.monotonic() - t

    assert 0.15 < asyncio.run(main()) < 2


def test_limiter_core_takes_released_leases_with_the_next_acquire():
    async def main():
        core = HostLimiterCore(concurrency=1, rps=1000, lease_ttl_s=30)
        first = await core.acquire("h")
        # The only slot is held; handing it back with the next acquire must not deadlock.
        second = await asyncio.wait_for(core.acquire("h", [("h", first)]), 1.0)
        return first, second, len(core.hosts["h"].active)

    first, second, active = asyncio.run(main())
    assert second != first and active == 1


def test_limiter_core_spaces_the_next_start_from_a_reused_lease():
    """A client that reused its lease reports when its last request started; the host's next
    start waits the interval from that one, not from when the actor granted the lease."""
    async def main():
        core = HostLimiterCore(concurrency=1, rps=1000, lease_ttl_s=30)
        await core.set_crawl_delay("h", 0.3)
        lease, spacing, _, _ = await core.lease("h")
        await asyncio.sleep(0.35)  # the client's own second request starts now, spaced by itself
        t = time.monotonic()
        await core.lease("h", [("h", lease, 2, 0.0)])  # handed back right after that start
        return spacing, time.monotonic() - t

    spacing, waited = asyncio.run(main())
    assert spacing == pytest.approx(0.3)
    assert waited >= 0.3 * 0.95  # without the report it would start at once (0.35 s after the grant)


def test_limiter_core_forget_withdraws_waiting_and_takes_back_granted():
    async def main():
        core = HostLimiterCore(concurrency=1, rps=1000, lease_ttl_s=30)
        held = await core.acquire("h")
        waiting = asyncio.ensure_future(core.lease("h", ticket="t-wait"))
        granted, *_ = await core.lease("g", ticket="t-granted")   # answered, but its client left
        await asyncio.sleep(0.01)
        await core.forget(["t-wait", "t-granted"])
        await asyncio.sleep(0.01)
        assert waiting.cancelled()
        assert core.hosts["g"].active == {}                          # the granted lease came back
        await core.release("h", held)
        nxt = await asyncio.wait_for(core.acquire("h"), 1.0)         # the withdrawn waiter got nothing
        return core.hosts["h"].active, nxt

    active, nxt = asyncio.run(main())
    assert list(active) == [nxt]


def test_limiter_core_forget_races_a_grant_on_its_way():
    async def main():
        core = HostLimiterCore(concurrency=1, rps=1000, lease_ttl_s=30)
        held = await core.acquire("h")
        waiter = asyncio.ensure_future(core.lease("h", ticket="t"))
        await asyncio.sleep(0.01)
        await core.release("h", held)   # the slot is handed to the waiter ...
        await core.forget(["t"])        # ... whose client leaves before it resumes
        await waiter
        return core.hosts["h"].active

    assert asyncio.run(main()) == {}    # nothing leaked


# ---- the fetcher against a real server ------------------------------------------------------

CFG = CrawlConfig(connect_timeout_s=0.5, read_timeout_s=0.3, page_timeout_s=1.0, max_retries=2, backoff_s=0.02,
                  max_page_bytes=64 * 1024, max_redirects=3, per_host_rps=1000, per_host_concurrency=8)


@pytest.fixture(scope="module")
def server():
    routes = {
        "/ok": Reply(body=html_page("ok", "<p>好</p>").encode()),
        "/r1": Reply(302, headers={"Location": "/r2"}),
        "/r2": Reply(301, headers={"Location": "http://127.0.0.1:1/elsewhere"}),
        "/r3": Reply(307, headers={"Location": "/ok"}),
        "/loop-a": Reply(302, headers={"Location": "/loop-b"}),
        "/loop-b": Reply(302, headers={"Location": "/loop-a"}),
        "/chain0": Reply(302, headers={"Location": "/chain1"}),
        "/chain1": Reply(302, headers={"Location": "/chain2"}),
        "/chain2": Reply(302, headers={"Location": "/chain3"}),
        "/chain3": Reply(302, headers={"Location": "/chain4"}),
        "/chain4": Reply(302, headers={"Location": "/ok"}),
        "/to-mailto": Reply(302, headers={"Location": "mailto:a@b.cn"}),
        "/slow": Reply(body=b"late", delay=1.0),
        "/stream": Reply(stream_bytes=64 * 1024 * 1024),
        "/big": Reply(body=b"x" * (200 * 1024)),
        "/png": Reply(body=b"\x89PNG\r\n\x1a\n" + b"\0" * 100, content_type="image/png"),
        "/notype": Reply(body=b"\x00\x01binary", content_type=""),
        "/badgzip": Reply(body=b"not gzip at all", headers={"Content-Encoding": "gzip"}),
        "/404": Reply(404, b"no"),
        "/500": Reply(500, b"err"),
        "/429": lambda n: Reply(429, b"wait", headers={"Retry-After": "1"}) if n == 1 else Reply(body=b"<p>ok</p>"),
        "/503-long": Reply(503, b"down", headers={"Retry-After": "3600"}),
    }
    with SiteServer(routes) as s:
        yield s


def _fetch(server, path, cfg=CFG, allowed=None):
    async def main():
        async with make_client(cfg, 8) as client:
            f = Fetcher(cfg, client, LocalLimiter(HostLimiterCore(8, 1000, 30)), allowed)
            return await f.fetch(server.url(path))
    return asyncio.run(main())


def test_fetch_ok_sends_honest_user_agent(server):
    row = _fetch(server, "/ok")
    assert row["error_kind"] == "" and row["status"] == 200 and "好".encode() in row["body"]
    assert server.hits_for("/ok")[-1].user_agent == CFG.user_agent


def test_fetch_redirects(server):
    row = _fetch(server, "/r3")
    assert row["final_url"] == server.url("/ok") and row["status"] == 200
    row = _fetch(server, "/r1")  # same-origin hop followed, cross-origin handed back
    assert row["redirect_to"] == "http://127.0.0.1:1/elsewhere" and row["final_url"] == server.url("/r2")
    assert _fetch(server, "/loop-a")["error_kind"] == "redirect_loop"
    assert _fetch(server, "/chain0")["error_kind"] == "too_many_redirects"
    assert _fetch(server, "/to-mailto")["error_kind"] == "bad_redirect"
    assert _fetch(server, "/r3", allowed=lambda u: not u.endswith("/ok"))["error_kind"] == "robots_disallowed"


def test_fetch_caps_and_types(server):
    row = _fetch(server, "/stream")
    assert row["error_kind"] == "too_large" and row["attempts"] == 1
    time.sleep(0.2)
    assert server.hits_for("/stream")[-1].bytes_sent < 32 * 1024 * 1024  # stopped reading early
    assert _fetch(server, "/big")["error_kind"] == "too_large"
    assert _fetch(server, "/png")["error_kind"] == "content_type"
    assert _fetch(server, "/notype")["error_kind"] == "content_type"
    row = _fetch(server, "/badgzip")  # a broken body is the server's fault: recorded, not retried
    assert row["error_kind"] == "decoding" and row["attempts"] == 1 and "gzip" in row["message"]


def test_fetch_retries(server):
    row = _fetch(server, "/slow")
    assert row["error_kind"] == "timeout" and row["attempts"] == 3
    assert _fetch(server, "/404")["attempts"] == 1
    row = _fetch(server, "/500")
    assert row["error_kind"] == "http_5xx" and row["attempts"] == 3 and row["status"] == 500
    row = _fetch(server, "/429")
    assert row["error_kind"] == "" and row["attempts"] == 2
    first, second = server.hits_for("/429")[:2]
    assert second.start - first.start >= 0.95  # Retry-After: 1 honoured
    row = _fetch(server, "/503-long", cfg=CFG.model_copy(update={"max_retry_after_s": 5}))
    assert row["error_kind"] == "http_5xx" and row["attempts"] == 1 and "max_retry_after_s" in row["message"]
