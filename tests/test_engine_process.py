"""EngineProcess: the engine in a child process gives the in-process engine's replies, streams,
cancels, reports the child's stats, and fails open requests when the child dies."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from zhchat.dialogue import Message, PromptTooLong
from zhchat.engine import Engine, EngineError, EngineProcess, SamplingParams

CONVS = [[Message("user", "你好")], [Message("user", "今天天气怎么样？我们去公园散步吧。")]]


@pytest.fixture(scope="module")
def proc(tiny_model_dir):
    e = EngineProcess(tiny_model_dir, max_batch_size=4)
    yield e
    e.close()


def test_same_replies_as_the_in_process_engine(proc, tiny_model_dir):
    local = Engine.from_pretrained(tiny_model_dir, max_batch_size=4)
    try:
        params = [SamplingParams(max_tokens=20, seed=s, no_repeat_ngram_size=0) for s in (1, 2)]
        assert proc.chat_completions(CONVS, params) == local.chat_completions(CONVS, params)
        assert proc.context_length == local.context_length and proc.vocab_size == local.vocab_size
    finally:
        local.close()


def test_streams_cancels_and_counts(proc):
    """Leaving a stream early cancels the request in the child: its `cancelled` counter (which
    no finished request moves) goes up by one and it stops generating."""
    fmt = proc.fmt  # every special token ends a reply: none may, so it runs until cancelled
    no_stop = {t: -100.0 for t in (fmt.eos_id, fmt.end_id, *fmt.role_ids.values())}

    async def first_delta_then_stop():
        prompt = proc.chat_prompt(CONVS[1], 100)
        params = SamplingParams(max_tokens=100, seed=3, no_repeat_ngram_size=0, logit_bias=no_stop)
        async for d in proc.astream(prompt, params):
            return d  # leaving the loop cancels the request in the child

    list(proc.stream(proc.chat_prompt(CONVS[0], 5), SamplingParams(max_tokens=5, seed=1)))  # finishes
    before = proc.stats
    d = asyncio.run(first_delta_then_stop())
    assert d.error is None and d.completion_tokens >= 1 and d.finish_reason is None
    deadline = time.monotonic() + 10  # the cancel reaches the child
    while proc.stats["cancelled"] == before["cancelled"] and time.monotonic() < deadline:
        time.sleep(0.05)
    after = proc.stats
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["requests"] == before["requests"] + 1
    time.sleep(0.3)
    assert proc.stats["completion_tokens"] == after["completion_tokens"] < before["completion_tokens"] + 100
    info = proc.info()
    assert info["engine"] == "zhchat" and info["engine_pid"] == proc.pid and info["stats"]["cancelled"] >= 1
    proc.check_health()
    with pytest.raises(PromptTooLong):
        proc.submit(list(range(proc.context_length + 5)), SamplingParams(), lambda d: None)
    with pytest.raises(ValueError, match="logit_bias"):
        proc.submit([1, 2], SamplingParams(logit_bias={proc.vocab_size: 1.0}), lambda d: None)


def test_a_dead_child_fails_open_requests(tiny_model_dir):
    e = EngineProcess(tiny_model_dir)
    got = []
    os.kill(e.pid, signal.SIGSTOP)  # frozen: the request below cannot finish first
    e.submit(e.chat_prompt(CONVS[0], 20), SamplingParams(max_tokens=20, seed=1), got.append)
    os.kill(e.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while not got and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(got) == 1 and "engine process exited" in got[0].error, got
    with pytest.raises(EngineError, match="engine process"):
        e.check_health(timeout_s=2)
    assert isinstance(e.stats, dict) and "exited" in e.error  # the last counters, not an exception
    with pytest.raises(EngineError, match="engine process"):
        e.submit([1, 2, 3], SamplingParams(), got.append)
    e.close()
