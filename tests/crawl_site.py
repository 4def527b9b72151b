"""A real HTTP server on 127.0.0.1 for crawler tests and the crawl benchmark.

Routes map a path to a Reply (or a function of how many times the path was asked for that
returns one). Every request is logged with server-side start/end times, and the server
tracks how many requests it is serving at once, so tests can check politeness from the
server's point of view.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    content_type: str = "text/html; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0            # seconds before answering
    stream_bytes: int = 0         # >0: stream this many bytes without Content-Length, then close


@dataclass
class Hit:
    path: str
    start: float                  # time.monotonic() when the request line was read
    end: float = 0.0
    user_agent: str = ""
    bytes_sent: int = 0


Route = Reply | Callable[[int], Reply]


class SiteServer:
    def __init__(self, routes: dict[str, Route], host: str = "127.0.0.1", delay: float = 0.0):
        self.routes = routes
        self.delay = delay
        self.hits: list[Hit] = []
        self.active = 0
        self.max_active = 0
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body go out in two writes; with Nagle on, the body waits for the
            # client's delayed ACK (40 ms on Linux), which no real server adds to a response.
            disable_nagle_algorithm = True

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                hit = Hit(self.path, time.monotonic(), user_agent=self.headers.get("User-Agent", ""))
                with server._lock:
                    server.hits.append(hit)
                    n = server._counts[self.path] = server._counts.get(self.path, 0) + 1
                    server.active += 1
                    server.max_active = max(server.max_active, server.active)
                done = False
                try:
                    route = server.routes.get(self.path)
                    reply = Reply(404, b"not found", "text/plain") if route is None else \
                        (route(n) if callable(route) else route)
                    wait = reply.delay + server.delay
                    if wait:
                        time.sleep(wait)
                    # Count the request as finished before the client can see its last byte, so a
                    # client that starts the next request on receipt never looks like n+1 at once.
                    with server._lock:
                        server.active -= 1
                        done = True
                    self.send_response(reply.status)
                    self.send_header("Content-Type", reply.content_type)
                    for k, v in reply.headers.items():
                        self.send_header(k, v)
                    if reply.stream_bytes:
                        self.send_header("Connection", "close")
                        self.end_headers()
                        chunk = b"<p>" + "大".encode("utf-8") * 20000 + b"</p>"
                        while hit.bytes_sent < reply.stream_bytes:
                            self.wfile.write(chunk)
                            hit.bytes_sent += len(chunk)
                        self.close_connection = True
                    else:
                        self.send_header("Content-Length", str(len(reply.body)))
                        self.end_headers()
                        self.wfile.write(reply.body)
                        hit.bytes_sent = len(reply.body)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True
                finally:
                    if not done:
                        with server._lock:
                            server.active -= 1
                    hit.end = time.monotonic()

        self.httpd = ThreadingHTTPServer((host, 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.request_queue_size = 128
        self.host = host
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def url(self, path: str = "/") -> str:
        return f"http://{self.host}:{self.port}{path}"

    def paths(self) -> list[str]:
        with self._lock:
            return [h.path for h in self.hits]

    def count(self, path: str) -> int:
        return self.paths().count(path)

    def hits_for(self, path: str) -> list[Hit]:
        with self._lock:
            return [h for h in self.hits if h.path == path]

    def reset_log(self) -> None:
        with self._lock:
            self.hits.clear()
            self.max_active = 0

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> "SiteServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def html_page(title: str, body: str, charset: str | None = "utf-8", meta: str | None = None) -> str:
    """An HTML document; `meta` is the charset written in <meta> (None: no <meta charset>)."""
    head = f'<meta charset="{meta}">' if meta else ""
    return f"<!DOCTYPE html><html><head>{head}<title>{title}</title></head><body>{body}</body></html>"


def tree_site(n_lists: int, per_list: int, delay: float = 0.0, text: str = "这是一篇测试文章，内容是关于北京的秋天。") -> SiteServer:
    """An index linking to n_lists list pages, each linking to per_list articles (UTF-8)."""
    return SiteServer(tree_routes(n_lists, per_list, text), delay=delay)


def tree_routes(n_lists: int, per_list: int, text: str) -> dict[str, Reply]:
    routes: dict[str, Route] = {"/robots.txt": Reply(body=b"User-agent: *\nAllow: /\n", content_type="text/plain")}
    lists = "".join(f'<li><a href="/list/{i}.html">列表{i}</a></li>' for i in range(n_lists))
    routes["/"] = Reply(body=html_page("首页", f"<ul>{lists}</ul>").encode())
    for i in range(n_lists):
        items = "".join(f'<li><a href="/a/{i}/{j}.html">文章{i}-{j}</a></li>' for j in range(per_list))
        routes[f"/list/{i}.html"] = Reply(body=html_page(f"列表{i}", f"<ul>{items}</ul>").encode())
        for j in range(per_list):
            body = f"<article><h1>文章{i}-{j}</h1><p>{text}第{i}组第{j}篇。</p></article>"
            routes[f"/a/{i}/{j}.html"] = Reply(body=html_page(f"文章{i}-{j}", body).encode())
    return routes
