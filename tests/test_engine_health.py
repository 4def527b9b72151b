"""Serve's periodic health check must not queue behind user requests: a replica whose
engine is busy with a full batch and a long queue is healthy. The engine's liveness probe
(check_alive) answers within a step; the old probe, a one-token request, waited its turn."""

from __future__ import annotations

import queue
import time

import pytest


@pytest.fixture(scope="module")
def busy_process_engine(tiny_model_dir):
    """A real engine child process with room for one sequence and 24 long requests queued."""
    from zhchat.dialogue import SPECIAL_TOKENS, Message
    from zhchat.engine import EngineProcess, SamplingParams

    engine = EngineProcess(tiny_model_dir, max_batch_size=1)
    sink: queue.Queue = queue.Queue()
    prompt = engine.chat_prompt([Message("user", "你好")], 100)
    params = SamplingParams(max_tokens=100, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0,
                            no_repeat_ngram_size=0, seed=1, logit_bias={engine.tokenizer.convert_tokens_to_ids(t): -100.0 for t in SPECIAL_TOKENS})
    handles = [engine.submit(prompt, params, sink.put) for _ in range(24)]
    yield engine
    for h in handles:
        engine.cancel(h)
    engine.close()


def test_liveness_answers_while_a_generation_request_waits_its_turn(busy_process_engine):
    from zhchat.engine import EngineError

    engine = busy_process_engine
    t0 = time.monotonic()
    engine.check_alive(timeout_s=1.0)  # answered between two steps
    assert time.monotonic() - t0 < 1.0
    with pytest.raises(EngineError, match="no token within"):
        engine.check_health(timeout_s=1.0)  # a 1-token request queued behind 24 long ones
    assert engine.info()["stats"]["requests"] < 24  # still busy: the queue had not drained


def test_liveness_fails_when_the_engine_process_is_gone(tiny_model_dir):
    import os
    import signal

    from zhchat.engine import EngineError, EngineProcess

    engine = EngineProcess(tiny_model_dir, max_batch_size=1)
    engine.check_alive(timeout_s=5)
    os.kill(engine.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while engine.error is None and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(EngineError, match="exited"):
        engine.check_alive(timeout_s=1)
    engine.close()


def test_in_process_engine_liveness_sees_a_stalled_step(tiny_model_dir):
    """The in-process engine: alive while it works; a step that stopped finishing fails."""
    from zhchat.engine import Engine, EngineError

    engine = Engine.from_pretrained(tiny_model_dir, device="cpu", max_batch_size=1)
    engine.check_alive(timeout_s=0.5)  # idle is alive
    engine._waiting.append(object())  # work waiting ...
    engine._beat = time.monotonic() - 5  # ... and no step for 5 s: what a hung forward pass looks like
    with pytest.raises(EngineError, match="no engine step"):
        engine.check_alive(timeout_s=1)
    engine._waiting.clear()
    engine.close()
