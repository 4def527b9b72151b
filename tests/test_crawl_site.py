"""The whole crawler on Ray Data against real HTTP servers on 127.0.0.1.

The servers log every request with server-side timestamps, so what was fetched, how often,
and how politely is checked from the server's side, not from the crawler's own account.
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from crawl_site import Reply, SiteServer, html_page, tree_site
from pipelines.crawl import crawl
from zhchat.config import CrawlConfig, SelectorConfig
from zhchat.tables import DIALOGUE_SCHEMA

ZH = "我们今天去公园散步，天气很好。北京的秋天特别美，上海的小笼包很好吃。"
ZH2 = "明天要下雨，记得带伞。周末你打算做什么？我想在家看书，然后做饭。"
TW = "我們今天去公園散步，天氣很好。臺北的秋天特別美，小籠包很好吃。你吃飯了嗎？"


def _table(out: str, name: str) -> list[dict]:
    rows = []
    for f in sorted(glob.glob(os.path.join(out, name, "*.parquet"))):
        rows += pq.read_table(f).to_pylist()
    return rows


def _article(text: str, title: str = "标题") -> str:
    return f"<article><h1>{title}</h1><p>{text}</p><p>{text}</p></article>"


def _site_routes(port_holder: dict) -> dict:
    def other(host: str, path: str) -> str:
        return f"http://{host}:{port_holder['port']}{path}"

    def index(_n: int) -> Reply:
        links = ["/gbk.html", "/gb2312.html", "/big5.html", "/nodecl.html", "/wrong.html", "/plain.txt",
                 "/thread/1.html", "/thread/2.html", "/private/secret.html", "/redirect/a", "/loop/a",
                 "/slow", "/huge", "/missing", "/broken", "/busy", "/logo.png", "/deep/1.html",
                 "/gbk.html#again", other("127.0.0.2", "/offsite.html"), other("localhost", "/other.html"),
                 "mailto:someone@example.cn", "ftp://127.0.0.1/file.txt", "javascript:void(0)"]
        body = "".join(f'<a href="{u}">链接</a> ' for u in links) + _article(ZH)
        return Reply(body=html_page("首页", body, meta="utf-8").encode())

    thread1 = ('<div class="post">楼主：周末去哪儿玩？</div><div class="reply">一楼：去爬香山吧。</div>'
               '<div class="reply">二楼：香山人太多了，去植物园。</div>')
    thread2 = '<div class="post">请问北京哪里的烤鸭好吃？</div><div class="reply">全聚德和便宜坊都不错。</div>'
    redirect = lambda to, code=302: Reply(code, headers={"Location": to})  # noqa: E731
    return {
        "/robots.txt": Reply(body=b"User-agent: *\nDisallow: /private/\nCrawl-delay: 0.05\n", content_type="text/plain"),
        "/": index,
        "/gbk.html": Reply(body=html_page("GBK", _article(ZH)).encode("gbk"), content_type="text/html; charset=GBK"),
        "/gb2312.html": Reply(body=html_page("GB2312", _article("朱镕基" + ZH2), meta="gb2312").encode("gbk"),
                              content_type="text/html"),
        "/big5.html": Reply(body=html_page("Big5", _article(TW, "標題")).encode("big5"), content_type="text/html; charset=big5"),
        "/nodecl.html": Reply(body=html_page("none", _article(ZH2)).encode("gbk"), content_type="text/html"),
        "/wrong.html": Reply(body=html_page("wrong", _article(ZH + ZH2), meta="utf-8").encode("gbk"),
                             content_type="text/html; charset=utf-8"),
        "/plain.txt": Reply(body=(ZH2 + "\n").encode("gbk"), content_type="text/plain; charset=gbk"),
        "/thread/1.html": Reply(body=html_page("帖子", thread1, meta="utf-8").encode()),
        "/thread/2.html": Reply(body=html_page("帖子", thread2, meta="gbk").encode("gbk"), content_type="text/html"),
        "/private/secret.html": Reply(body=html_page("secret", _article("秘密")).encode()),
        "/redirect/a": redirect("/redirect/b"),
        "/redirect/b": redirect("/landing.html", 301),
        "/landing.html": Reply(body=html_page("落地页", _article(ZH2)).encode()),
        "/loop/a": redirect("/loop/b"),
        "/loop/b": redirect("/loop/a"),
        "/slow": Reply(body=b"<p>late</p>", delay=1.5),
        "/huge": Reply(stream_bytes=64 * 1024 * 1024),
        "/broken": Reply(500, b"oops", "text/plain"),
        "/busy": lambda n: Reply(429, b"slow down", "text/plain", headers={"Retry-After": "1"}) if n == 1
        else Reply(body=html_page("忙", _article(ZH)).encode()),
        "/logo.png": Reply(body=b"\x89PNG\r\n\x1a\n" + b"\0" * 64, content_type="image/png"),
        "/deep/1.html": Reply(body=html_page("d1", '<a href="/deep/2.html">下一页</a>' + _article(ZH)).encode()),
        "/deep/2.html": Reply(body=html_page("d2", '<a href="/deep/3.html">下一页</a>' + _article(ZH)).encode()),
        "/deep/3.html": Reply(body=html_page("d3", _article(ZH)).encode()),
    }


def _cfg(seed: str, **kw) -> CrawlConfig:
    base = dict(seeds=[seed], max_depth=2, per_host_concurrency=3, per_host_rps=100, max_retries=2, backoff_s=0.05,
                connect_timeout_s=0.5, read_timeout_s=0.4, page_timeout_s=3, max_page_bytes=256 * 1024,
                workers=2, batch_size=4, fetch_concurrency=8)
    base.update(kw)
    return CrawlConfig(**base)


@pytest.fixture(scope="module")
def site_crawl(ray_cluster, tmp_path_factory):
    holder: dict = {}
    server = SiteServer(_site_routes(holder))
    holder["port"] = server.port
    out = str(tmp_path_factory.mktemp("crawl") / "out")
    cfg = _cfg(server.url("/"), selectors=[SelectorConfig(url_pattern=r"/thread/", post="div.post", replies="div.reply")])
    summary = crawl(cfg, out)
    yield server, out, summary
    server.close()


def test_fetched_skipped_and_errors(site_crawl):
    server, out, summary = site_crawl
    paths = server.paths()
    # robots.txt once, disallowed and too-deep pages never, other hosts never (they are not served
    # here anyway: a request to 127.0.0.2 or localhost would have shown up as a connection error).
    assert paths.count("/robots.txt") == 1
    assert "/private/secret.html" not in paths and "/deep/3.html" not in paths
    assert paths.count("/gbk.html") == 1  # the #again link is the same page
    for p in ["/", "/gbk.html", "/big5.html", "/thread/1.html", "/landing.html", "/deep/2.html", "/missing", "/logo.png"]:
        assert paths.count(p) == 1, p
    assert paths.count("/slow") == 3 and paths.count("/broken") == 3 and paths.count("/busy") == 2
    busy = server.hits_for("/busy")
    assert busy[1].start - busy[0].start >= 0.95  # Retry-After: 1

    errors = {r["url"].rsplit(":", 1)[1].split("/", 1)[1]: r for r in _table(out, "errors")}
    expect = {"private/secret.html": ("robots_disallowed", 0), "loop/a": ("redirect_loop", 1),
              "slow": ("timeout", 3), "huge": ("too_large", 1), "missing": ("http_4xx", 1),
              "broken": ("http_5xx", 3), "logo.png": ("content_type", 1)}
    assert {k: (v["kind"], v["attempts"]) for k, v in errors.items()} == expect
    assert errors["missing"]["status"] == 404 and errors["broken"]["status"] == 500
    assert max(h.bytes_sent for h in server.hits_for("/huge")) < 32 * 1024 * 1024  # stopped reading

    assert summary["skipped_robots"] == 1 and summary["errors"] == 6
    assert summary["links_offsite"] >= 2 and summary["links_bad_scheme"] == 3
    assert summary["outcomes"]["ok"] == summary["pages"]
    assert all(h.user_agent.startswith("zhchat-crawler/") for h in server.hits)


def test_pages_decoded_and_charsets_recorded(site_crawl):
    server, out, _ = site_crawl
    pages = {r["url"].split(str(server.port), 1)[1]: r for r in _table(out, "pages")}
    assert pages["/gbk.html"]["charset"] == "gb18030" and ZH in pages["/gbk.html"]["text"]
    assert "朱镕基" in pages["/gb2312.html"]["text"] and pages["/gb2312.html"]["charset_declared"] == "gb2312"
    assert pages["/big5.html"]["charset"] == "big5hkscs" and TW in pages["/big5.html"]["text"]
    assert ZH2 in pages["/nodecl.html"]["text"] and pages["/nodecl.html"]["charset_declared"] == ""
    wrong = pages["/wrong.html"]
    assert wrong["charset_mismatch"] and wrong["charset_declared"] == "utf-8" and wrong["charset"] == "gb18030"
    assert ZH in wrong["text"]
    assert ZH2 in pages["/plain.txt"]["text"]
    assert not any(p["charset_mismatch"] for k, p in pages.items() if k != "/wrong.html")
    assert pages["/redirect/a"]["final_url"] == server.url("/landing.html") and ZH2 in pages["/redirect/a"]["text"]
    assert pages["/deep/2.html"]["depth"] == 2
    assert {"url", "final_url", "status", "charset", "charset_declared", "charset_mismatch", "fetched_at",
            "text"} <= set(pages["/"].keys())


def test_threads_become_dialogues(site_crawl):
    server, out, summary = site_crawl
    files = glob.glob(os.path.join(out, "dialogues", "*.parquet"))
    assert all(pq.read_schema(f).equals(DIALOGUE_SCHEMA) for f in files)
    rows = {r["source"].split(str(server.port), 1)[1]: r for r in _table(out, "dialogues")}
    assert rows["/thread/1.html"]["turns"] == ["楼主：周末去哪儿玩？", "一楼：去爬香山吧。", "二楼：香山人太多了，去植物园。"]
    assert rows["/thread/2.html"]["turns"] == ["请问北京哪里的烤鸭好吃？", "全聚德和便宜坊都不错。"]
    assert len(rows["/gbk.html"]["turns"]) == 1 and ZH in rows["/gbk.html"]["turns"][0]  # a text row
    assert summary["dialogues"] == 2 and summary["text_rows"] >= 8


def _max_in_window(starts: list[float], window: float) -> int:
    starts = sorted(starts)
    best, j = 0, 0
    for i, t in enumerate(starts):
        while starts[j] < t - window:
            j += 1
        best = max(best, i - j + 1)
    return best


def test_per_host_limits_hold_across_workers(ray_cluster, tmp_path):
    """2 Ray tasks fetch at once; the server must never see more than the cluster-wide limit."""
    with tree_site(3, 9, delay=0.15) as server:  # 1 + 3 + 27 pages
        cfg = _cfg(server.url("/"), per_host_concurrency=2, per_host_rps=10, workers=2, batch_size=3)
        summary = crawl(cfg, str(tmp_path / "out"), progress=False)
        assert summary["pages"] == 31
        starts = [h.start for h in server.hits if h.path != "/robots.txt"]
        assert server.max_active <= 2
        # 10 requests/s: no 1-second window holds more than 10 (+2 for arrival jitter on a busy
        # machine), and the whole crawl cannot be faster than the schedule allows.
        assert _max_in_window(starts, 1.0) <= 12
        assert max(starts) - min(starts) >= (len(starts) - 1) * 0.1 * 0.9


def test_actor_limiter_client_returns_every_lease(ray_cluster):
    """fetch_many through the real limiter actor: leases ride on the next acquire or are
    flushed, so none is left out when the batch ends (a leak would stall the host for a TTL)."""
    import asyncio

    import ray

    from pipelines.crawl.fetch import fetch_many
    from pipelines.crawl.limiter import ActorLimiter, get_or_create_limiter, stop_limiter

    with tree_site(1, 12) as server:
        handle = get_or_create_limiter("lease-test", 3, 1000, 60)
        try:
            cfg = _cfg(server.url("/"), fetch_concurrency=4)
            rows = [{"url": server.url(f"/a/0/{j}.html"), "depth": 1} for j in range(12)]
            out = asyncio.run(fetch_many(rows, cfg, ActorLimiter(handle), then=lambda r: r["url"]))
            assert out == [r["url"] for r in rows]  # input order, mapped by `then`
            deadline = time.monotonic() + 5  # the last hand-back is fire-and-forget
            while True:
                stats = ray.get(handle.stats.remote())
                host = next(iter(stats))
                if stats[host]["in_flight"] == 0 or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            # Every request counted (reused leases included) and every lease back.
            assert stats[host]["granted"] == 12 and stats[host]["in_flight"] == 0
            assert server.max_active <= 3
        finally:
            stop_limiter(handle)


def test_crawl_delay_slows_the_host(ray_cluster, tmp_path):
    routes = {"/robots.txt": Reply(body=b"User-agent: zhchat-crawler\nCrawl-delay: 0.3\n", content_type="text/plain")}
    links = "".join(f'<a href="/p{i}">p</a>' for i in range(6))
    routes["/"] = Reply(body=html_page("i", links).encode())
    routes.update({f"/p{i}": Reply(body=html_page("p", _article(ZH)).encode()) for i in range(6)})
    with SiteServer(routes) as server:
        crawl(_cfg(server.url("/"), per_host_rps=100), str(tmp_path / "out"), progress=False)
        starts = sorted(h.start for h in server.hits if h.path != "/robots.txt")
        assert len(starts) == 7
        assert starts[-1] - starts[0] >= 6 * 0.3 * 0.9


def test_resume_fetches_nothing_twice(ray_cluster, tmp_path):
    out = str(tmp_path / "out")
    with tree_site(3, 6) as server:  # 22 pages
        cfg = _cfg(server.url("/"), max_pages=8)
        first = crawl(cfg, out, progress=False)
        assert first["fetched"] == 8 and first["budget_left"] == 0
        second = crawl(cfg.model_copy(update={"max_pages": 100}), out, progress=False)
        third = crawl(cfg.model_copy(update={"max_pages": 100}), out, progress=False)
        paths = [p for p in server.paths() if p != "/robots.txt"]
    assert second["fetched"] == 14 and third["fetched"] == 0
    assert len(paths) == len(set(paths)) == 22
    urls = [r["url"] for r in _table(out, "pages")]
    assert len(urls) == len(set(urls)) == 22


_KILLED_DRIVER = """
import sys, ray
from zhchat.config import CrawlConfig
from pipelines.crawl import crawl
ray.init(address=sys.argv[1], logging_level="WARNING")
cfg = CrawlConfig.model_validate_json(sys.argv[2])
crawl(cfg, sys.argv[3], progress=False)
"""


@pytest.mark.slow
def test_killed_crawl_loses_only_pages_in_flight(ray_cluster, tmp_path):
    """A driver killed with SIGKILL mid-crawl; the rerun refetches only what was not committed."""
    out = str(tmp_path / "out")
    with tree_site(4, 10, delay=0.2) as server:  # 45 pages at 2 in flight x 0.2 s: ~5 s
        cfg = _cfg(server.url("/"), per_host_concurrency=2, per_host_rps=100, batch_size=3)
        env = dict(os.environ, RAY_AUTH_MODE=os.environ.get("RAY_AUTH_MODE", "token"))
        gcs = ray_cluster.get_runtime_context().gcs_address
        proc = subprocess.Popen([sys.executable, "-c", _KILLED_DRIVER, gcs, cfg.model_dump_json(), out], env=env)
        try:
            deadline = time.monotonic() + 90
            while len(_table(out, "pages")) < 12 and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.1)
            assert proc.poll() is None, "the driver finished before it could be killed"
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        committed = {r["url"] for r in _table(out, "pages")}
        first_paths = [p for p in server.paths() if p != "/robots.txt"]
        time.sleep(0.5)  # in-flight requests of the dead tasks settle
        server.reset_log()
        crawl(cfg, out, progress=False)
        again = [p for p in server.paths() if p != "/robots.txt"]
    refetched = set(again) & set(first_paths)
    assert all(server.url(p) not in committed for p in refetched)  # only uncommitted pages come again
    assert len(refetched) <= 12
    urls = [r["url"] for r in _table(out, "pages")]
    assert len(urls) == len(set(urls)) == 45


def test_cli_crawl(ray_cluster, tmp_path, capsys):
    """`zhchat crawl --seed URL --out DIR` through the real CLI (Ray is already up, so it joins it)."""
    from zhchat.cli import main

    out = str(tmp_path / "cli")
    with tree_site(1, 3) as server:
        assert main(["crawl", "--seed", server.url("/"), "--out", out, "--max-pages", "3"]) == 0
        assert main(["crawl", "--seed", "ftp://example.cn/", "--out", out]) == 2  # bad seed: config error
    assert len(_table(out, "pages")) == 3
    assert os.path.exists(os.path.join(out, "state", "crawl.json"))
    err = "".join(capsys.readouterr().err.split())  # rich wraps lines on a narrow terminal
    assert "pagesbyoutcome" in err and "fetched(thisrun)" in err
