"""The chat page in headless Chromium, driven over the DevTools protocol (websockets):
type a message, see a streamed reply; ask for too many tokens, see the server's error."""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import time
import urllib.request

import pytest

from conftest import free_port
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
def page_url(ray_cluster, tiny_model_dir):
    from ray import serve

    from services import launch

    cfg = ServeConfig(model=tiny_model_dir, port=free_port(), max_replicas=1, ingress_cpus=0.1,
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
    # Count how many times the reply text grows while it streams.
    browser.js("window.__growth = 0; new MutationObserver(() => window.__growth++)"
               ".observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true}); true")
    browser.js("document.getElementById('temperature').value = '1.5'; true")  # the tiny model: non-empty replies
    send(browser, "你好")
    browser.wait("document.querySelector('.msg.assistant[data-state=done]') !== null")
    reply = browser.js("document.querySelector('.msg.assistant').textContent")
    user = browser.js("document.querySelector('.msg.user').textContent")
    assert user == "你好"
    assert reply and "\ufffd" not in reply
    assert browser.js("document.querySelectorAll('.msg.error').length") == 0
    assert browser.js("window.__growth") >= 3  # user bubble, reply bubble, then streamed text
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
