"""The sampler as a pure function (zhchat/engine/sampler.py): fixed logits and row state in,
tokens and raw logprobs out. No model, no engine."""

from __future__ import annotations

import pytest
import torch

from zhchat.engine import EngineError, SamplingParams
from zhchat.engine.sampler import Row, sample

V = 50
GREEDY = dict(temperature=0, repetition_penalty=1.0, no_repeat_ngram_size=0)


def logits(seed: int = 0, rows: int = 1) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * 3


def row(out=(), seed: int = 0, **params) -> Row:
    return Row(SamplingParams(**{**GREEDY, **params}), torch.Generator().manual_seed(seed), list(out))


def test_input_logits_are_not_modified():
    x = logits()
    before = x.clone()
    sample(x, [row(out=[1, 2, 3], repetition_penalty=2.0, presence_penalty=1.0, logit_bias={4: 5.0})],
           never=torch.arange(V) > 40)
    assert torch.equal(x, before)


def test_logit_bias_moves_the_choice_and_minus_100_bans():
    x = logits()
    best = int(x[0].argmax())
    worst = int(x[0].argmin())
    assert sample(x, [row()])[0] == [best]
    assert sample(x, [row(logit_bias={worst: 100.0})])[0] == [worst]
    banned = sample(x, [row(logit_bias={best: -100.0})])[0]
    assert banned != [best] and banned == [int(x[0].topk(2).indices[1])]
    # sampled rows too: a -100 token is never drawn, a +100 token always
    draws = {sample(x, [row(seed=s, temperature=1.5, top_k=0, top_p=1.0, logit_bias={best: -100.0})])[0][0]
             for s in range(200)}
    assert best not in draws and len(draws) > 5
    assert {sample(x, [row(seed=s, temperature=1.5, top_k=0, logit_bias={worst: 100.0})])[0][0]
            for s in range(50)} == {worst}


def test_bias_comes_after_the_penalties():
    """Token 0 leads 5 to 4; the reply used it, so repetition_penalty 2 halves it to 2.5. A
    bias of 2 added after the penalty (4.5) wins it back; added before ((5 + 2) / 2 = 3.5) it
    would not. The vLLM engine's logits processor keeps the same order."""
    x = torch.full((1, V), -5.0)
    x[0, 0], x[0, 1] = 5.0, 4.0
    assert sample(x, [row(out=[0], repetition_penalty=2.0)])[0] == [1]
    assert sample(x, [row(out=[0], repetition_penalty=2.0, logit_bias={0: 2.0})])[0] == [0]


def test_never_mask_and_ngram_bans():
    x = logits(1)
    best = int(x[0].argmax())
    never = torch.zeros(V, dtype=torch.bool)
    never[best] = True
    assert sample(x, [row()], never)[0] != [best]
    # no_repeat_ngram_size=2 after the reply "best 7 best": 7 would repeat the bigram (best, 7)
    r = row(no_repeat_ngram_size=2, logit_bias={7: 100.0})
    for t in [best, 7, best]:
        r.out.append(t)
        r.note_ngram()
    assert r.banned_next() == [7]
    assert sample(x, [r])[0] != [7]  # even with +100 on it
    assert sample(x, [row(out=[best, 7, best], logit_bias={7: 100.0})])[0] == [7]  # n-grams off: 7


def test_logprobs_are_raw_and_top_sorted():
    x = logits(2)
    raw = x[0].log_softmax(-1)
    tokens, lps = sample(x, [row(logprobs=3, repetition_penalty=3.0, out=[int(x[0].argmax())], temperature=0.7,
                                 seed=1, logit_bias={0: 50.0})])
    lp = lps[0]
    # Penalties, bias and temperature changed the choice, not the reported distribution.
    assert lp.logprob == pytest.approx(float(raw[tokens[0]]), abs=1e-5)
    want = raw.topk(3)
    assert lp.top_ids == want.indices.tolist()
    assert lp.top_logprobs == pytest.approx(want.values.tolist(), abs=1e-5)
    assert lp.top_logprobs == sorted(lp.top_logprobs, reverse=True)


def test_logprobs_per_row():
    x = logits(4, rows=3)
    tokens, lps = sample(x, [row(), row(logprobs=0), row(logprobs=5)])
    assert lps[0] is None
    assert lps[1].top_ids == [] and lps[1].logprob == pytest.approx(float(x[1].log_softmax(-1)[tokens[1]]), abs=1e-5)
    assert len(lps[2].top_ids) == 5 and lps[2].top_ids[0] == tokens[2]  # greedy: the best is the choice


def test_rows_keep_their_own_parameters_and_seeds():
    x = logits(5, rows=1).repeat(3, 1)
    params = [dict(seed=1, temperature=1.0, top_k=0, top_p=1.0), dict(seed=2, temperature=1.0, top_k=3),
              dict(temperature=0)]
    together = sample(x, [row(**p) for p in params])[0]
    alone = [sample(x[:1], [row(**p)])[0][0] for p in params]
    assert together == alone
    assert together[2] == int(x[0].argmax())
    # top_k=1 and a tiny top_p are greedy whatever the temperature
    assert {sample(x[:1], [row(seed=s, temperature=2.0, top_k=1)])[0][0] for s in range(20)} == {together[2]}
    assert {sample(x[:1], [row(seed=s, temperature=2.0, top_k=0, top_p=1e-6)])[0][0] for s in range(20)} == {together[2]}


def test_non_finite_logits_are_an_engine_error():
    x = logits()
    x[0, 3] = float("nan")
    with pytest.raises(EngineError, match="non-finite"):
        sample(x, [row()])


def test_schema_bounds():
    """One set of bounds (zhchat/engine/params.py), also what the config and API accept."""
    from pydantic import ValidationError

    from zhchat.config import EvalConfig, GenerationDefaults

    SamplingParams(repetition_penalty=0.5)  # below 1 encourages repetition: allowed everywhere
    GenerationDefaults(repetition_penalty=0.5)
    EvalConfig(repetition_penalty=0.5)
    for bad in (dict(repetition_penalty=0), dict(repetition_penalty=10.5), dict(top_p=0), dict(temperature=2.1),
                dict(no_repeat_ngram_size=33), dict(top_k=-1), dict(presence_penalty=2.5)):
        for make in (SamplingParams, GenerationDefaults, EvalConfig):
            with pytest.raises((ValidationError, ValueError)):
                make(**bad)
    for bad in (dict(logprobs=21), dict(logit_bias={1: 101.0}), dict(logit_bias={-1: 1.0}), dict(stop=["a"] * 5),
                dict(max_tokens=0)):
        with pytest.raises(ValidationError):
            SamplingParams(**bad)
    assert SamplingParams(stop="x").stop == ("x",)
