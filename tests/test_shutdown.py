"""`zhchat serve` stops cleanly on SIGTERM as on Ctrl-C: exit status 0, no C++ stack or
abort from Ray (ray.init installs a SIGTERM handler of its own: status 134 before), and a
request in flight finishes or ends with an error event, never a cut stream."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from conftest import build_tiny_tokenizer, free_port, own_cluster_env

pytestmark = pytest.mark.slow

# What Ray's C++ side and the interpreter print when a process dies badly.
CRASH_MARKS = ("*** SIGTERM received", "*** SIGABRT received", "Aborted", "core dumped", "Fatal Python error",
               "Check failed", "Traceback (most recent call last)")


def build_never_ending_model(out_dir: str, n_layer: int = 8, n_embd: int = 256, n_positions: int = 1024) -> str:
    """A GPT-2 whose special tokens are never likely, so a sampled reply runs to max_tokens:
    a constant ln_f bias b and special-token rows -b*10/|b|^2 give those tokens a logit of
    -10 whatever the input (the layer-normed part sums to 0 against b). At the default size
    a long reply takes seconds on this CPU."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from zhchat.dialogue import SPECIAL_TOKENS

    tok = build_tiny_tokenizer(out_dir)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=4,
                     tie_word_embeddings=False, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.eos_token_id)
    model = GPT2LMHeadModel(cfg)
    with torch.no_grad():
        model.transformer.ln_f.weight.fill_(0.1)
        model.transformer.ln_f.bias.fill_(1.0)
        for t in SPECIAL_TOKENS:
            model.lm_head.weight[tok.convert_tokens_to_ids(t)] = -10.0 / cfg.n_embd
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def slow_model_dir(tmp_path_factory):
    """Still generating when the signal comes: a long reply takes seconds."""
    return build_never_ending_model(str(tmp_path_factory.mktemp("slow_model")))


def _start(cmd: list[str], cwd) -> tuple[subprocess.Popen, list[str]]:
    proc = subprocess.Popen(cmd, env=own_cluster_env(), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    return proc, lines


def _wait_for(lines: list[str], proc: subprocess.Popen, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not any(text in ln for ln in lines):
        assert proc.poll() is None, "".join(lines)[-4000:]
        assert time.monotonic() < deadline, f"no {text!r} within {timeout}s:\n" + "".join(lines)[-4000:]
        time.sleep(0.5)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_stops_cleanly_with_a_request_in_flight(slow_model_dir, tmp_path, sig):
    port = free_port()
    proc, lines = _start([sys.executable, "-m", "zhchat.cli", "serve", "--model", slow_model_dir,
                          "--port", str(port), "--num-cpus", "2"], tmp_path)
    events: list[str] = []
    started = threading.Event()

    def stream() -> None:
        body = {"messages": [{"role": "user", "content": "你好"}], "max_tokens": 400, "temperature": 1.0,
                "seed": 1, "stream": True}
        try:
            with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        if '"content":"' in line and '"content":""' not in line:
                            started.set()
        except httpx.HTTPError as e:
            events.append(f"transport error: {type(e).__name__}: {e}")
        started.set()

    try:
        _wait_for(lines, proc, "serving at", 240)
        client = threading.Thread(target=stream)
        client.start()
        assert started.wait(60), events
        t0 = time.monotonic()
        proc.send_signal(sig)
        proc.wait(timeout=90)
        stop_s = time.monotonic() - t0
        client.join(timeout=60)
        out = "".join(lines)
        assert proc.returncode == 0, out[-4000:]
        assert "stopping" in out and not [m for m in CRASH_MARKS if m in out], out[-4000:]
        assert stop_s < 60, f"stopping took {stop_s:.0f}s"
        # The reply in flight ended as a stream ends: finished, or an error event; not cut.
        assert events and events[-1] == "[DONE]", events[-3:]
        last = json.loads(events[-2])
        assert "error" in last or last["choices"][0]["finish_reason"] == "length", last
        with pytest.raises(httpx.HTTPError):  # nothing answers any more
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
    finally:
        if proc.poll() is None:
            import os

            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_sigterm_while_ray_starts_exits_143_without_an_abort(tmp_path, tiny_model_dir):
    """SIGTERM before the app is up (here: while Ray starts) gives up as Ctrl-C does."""
    proc, lines = _start([sys.executable, "-m", "zhchat.cli", "serve", "--model", tiny_model_dir,
                          "--port", str(free_port()), "--num-cpus", "2"], tmp_path)
    try:
        time.sleep(4)  # the CLI has started; Ray is starting (a local cluster takes longer)
        assert proc.poll() is None, "".join(lines)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=90)
        out = "".join(lines)
        assert proc.returncode in (0, 143), (proc.returncode, out[-4000:])
        assert not [m for m in CRASH_MARKS if m in out], out[-4000:]
    finally:
        if proc.poll() is None:
            import os

            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
