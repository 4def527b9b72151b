"""The chat page in headless Chromium, driven over the DevTools protocol (websockets):
type a message, see the reply grow while it streams; ask for too many tokens, see the
server's error."""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import time
import urllib.request

import pytest

from conftest import free_port
from test_shutdown import build_never_ending_model
from zhchat.config import GenerationDefaults, ServeConfig

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed (apt-get install -y chromium)"),
]


class DevTools:
    """The few CDP calls the test needs, over one page's websocket."""

    def __init__(self, ws_url: str):
        from websockets.sync.client import connect

        self.ws = connect(ws_url, max_size=None)
        self.ids = itertools.count(1)

    def call(self, method: str, **params):
        i = next(self.ids)
        self.ws.send(json.dumps({"id": i, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == i:
                if "error" in msg:
                    raise RuntimeError(msg["error"])
                return msg["result"]

    def js(self, expr: str):
        r = self.call("Runtime.evaluate", expression=expr, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in r:
            raise RuntimeError(r["exceptionDetails"])
        return r["result"].get("value")

    def wait(self, expr: str, timeout: float = 60):
        end = time.time() + timeout
        while time.time() < end:
            v = self.js(expr)
            if v:
                return v
            time.sleep(0.2)
        raise TimeoutError(expr)


@pytest.fixture(scope="module")
def page_url(ray_cluster, tmp_path_factory):
    from ray import serve

    from services import launch

    # A reply of 64 tokens takes about a second here and never ends early; the server sends
    # what it has every 20 ms: the page must show the text growing over that second.
    model = build_never_ending_model(str(tmp_path_factory.mktemp("web_model")), n_positions=256)
    cfg = ServeConfig(model=model, port=free_port(), max_replicas=1, ingress_cpus=0.1, stream_interval_ms=20,
                      generation=GenerationDefaults(max_tokens=16, max_tokens_cap=100))
    url = launch.start(cfg, name="web", route_prefix="/web")
    yield url + "/"
    serve.delete("web")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    profile = tmp_path_factory.mktemp("chromium")
    proc = subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    port_file = profile / "DevToolsActivePort"
    for _ in range(300):
        if port_file.exists() and port_file.read_text().strip():
            break
        time.sleep(0.1)
    port = int(port_file.read_text().split()[0])
    targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json"))
    ws = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
    tools = DevTools(ws)
    yield tools
    tools.ws.close()
    proc.terminate()
    proc.wait(timeout=20)


def send(tools: DevTools, text: str) -> None:
    tools.js(f"document.getElementById('input').value = {json.dumps(text)};"
             "document.getElementById('form').requestSubmit(); true")


def test_message_gets_a_streamed_reply(page_url, browser):
    browser.call("Page.navigate", url=page_url)
    browser.wait("document.readyState === 'complete' && !!document.getElementById('input')")
    # Record the reply's length, with the time, each time the page changes it.
    browser.js("window.__sizes = []; new MutationObserver(() => { const r = document.querySelector('.msg.assistant');"
               " if (r) window.__sizes.push([performance.now(), r.textContent.length]); })"
               ".observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true}); true")
    browser.js("document.getElementById('max_tokens').value = '64'; true")
    send(browser, "你好")
    browser.wait("document.querySelector('.msg.assistant[data-state=done]') !== null")
    reply = browser.js("document.querySelector('.msg.assistant').textContent")
    user = browser.js("document.querySelector('.msg.user').textContent")
    assert user == "你好"
    assert reply and "\ufffd" not in reply
    assert browser.js("document.querySelectorAll('.msg.error').length") == 0
    # Streamed: the text grew in many steps spread over the reply's time, not in one piece.
    sizes = [(t, n) for t, n in browser.js("window.__sizes") if n > 0]
    steps = [sizes[0]] + [b for a, b in zip(sizes, sizes[1:]) if b[1] > a[1]]
    assert len(steps) >= 5, sizes
    assert steps[-1][1] == len(reply) and steps[-1][0] - steps[0][0] >= 200, steps
    # the conversation is kept: a second turn sends both earlier messages too
    send(browser, "今天天气怎么样？")
    browser.wait("document.querySelectorAll('.msg.assistant[data-state=done]').length === 2")
    assert browser.js("conversation.length") == 4


def test_server_error_is_shown(page_url, browser):
    browser.call("Page.navigate", url=page_url)
    browser.wait("document.readyState === 'complete' && !!document.getElementById('input')")
    browser.js("document.getElementById('max_tokens').value = '1000'; true")  # above the cap of 100
    send(browser, "你好")
    err = browser.wait("document.querySelector('.msg.error') && document.querySelector('.msg.error').textContent")
    assert "400" in err and "max_tokens" in err
    assert browser.js("document.querySelectorAll('.msg.assistant').length") == 0
