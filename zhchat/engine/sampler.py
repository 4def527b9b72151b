"""The sampler: next tokens from a batch of logits, as a pure function of the logits and
each row's parameters and state (its reply so far, n-gram table and random generator).

Per row, in this order (the vLLM engine's logits processor keeps the same order):
repetition/presence/frequency penalties over the reply's tokens, logit_bias, the tokens
that are never sampled (vocabulary padding), n-gram blocking, then temperature, top-k,
top-p and a draw from the row's generator (temperature 0: the best token). Logprobs, when
a row asks, are the raw distribution: log_softmax of the logits as the model gave them.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .params import SamplingParams
from .types import EngineError


@dataclass(eq=False)
class Row:
    """What the sampler reads of one sequence. The caller owns it: it appends each reply
    token to `out` and then calls `note_ngram()`; the generator advances as the sampler
    draws from it."""

    params: SamplingParams
    gen: torch.Generator
    out: list[int] = field(default_factory=list)        # reply tokens so far
    ngrams: dict[tuple[int, ...], set[int]] = field(default_factory=dict)

    def note_ngram(self) -> None:
        """Record the n-gram that the last token of `out` completed."""
        n = self.params.no_repeat_ngram_size
        if n > 0 and len(self.out) >= n:
            gram = self.out[-n:]
            self.ngrams.setdefault(tuple(gram[:-1]), set()).add(gram[-1])

    def banned_next(self) -> list[int]:
        """Tokens that would complete an n-gram already in the reply."""
        n = self.params.no_repeat_ngram_size
        if n <= 0 or len(self.out) < n - 1:
            return []
        key = tuple(self.out[len(self.out) - (n - 1):])
        return list(self.ngrams.get(key, ()))


@dataclass
class RowLogprobs:
    """The sampled token's raw logprob and the `logprobs` best alternatives (ids, logprobs)."""

    logprob: float
    top_ids: list[int]
    top_logprobs: list[float]


def sample(logits: torch.Tensor, rows: Sequence[Row], never: torch.Tensor | None = None
           ) -> tuple[list[int], list[RowLogprobs | None]]:
    """(token per row, logprobs per row or None). `logits` is [B, V] and is not modified;
    `never` is a [V] bool mask of tokens no row may sample.

    Penalties touch only the tokens a row has generated (a few dozen), not its whole
    vocabulary row: whole-row masks for three penalties were a fifth of a decode step."""
    x = logits.to(torch.float32, copy=True)  # [B, V]
    if not torch.isfinite(x.sum(-1)).all():  # any inf or nan makes its row's sum one
        raise EngineError("the model produced non-finite logits")
    raw_lp = _raw_logprobs(x, rows)
    dev = x.device
    col = lambda xs: torch.tensor(xs, dtype=torch.float32, device=dev)  # noqa: E731
    rws, cols, rep, minus = [], [], [], []
    brows, bcols, bvals = [], [], []
    for i, r in enumerate(rows):
        p = r.params
        if r.out and (p.repetition_penalty != 1 or p.presence_penalty or p.frequency_penalty):
            counts = collections.Counter(r.out)
            rws += [i] * len(counts)
            cols += counts.keys()
            rep += [p.repetition_penalty] * len(counts)
            minus += [(p.presence_penalty, p.frequency_penalty * n) for n in counts.values()]
        if p.logit_bias:
            brows += [i] * len(p.logit_bias)
            bcols += p.logit_bias.keys()
            bvals += p.logit_bias.values()
    if rws:
        at = (torch.tensor(rws, device=dev), torch.tensor(cols, device=dev))
        v, penalty = x[at], col(rep)
        pres, freq = col(minus).unbind(-1)
        x[at] = torch.where(v > 0, v / penalty, v * penalty) - pres - freq
    if brows:
        x[torch.tensor(brows, device=dev), torch.tensor(bcols, device=dev)] += col(bvals)
    if never is not None:
        x.masked_fill_(never, float("-inf"))
    for i, r in enumerate(rows):
        banned = r.banned_next()
        if banned:
            x[i, banned] = float("-inf")
    temps = [r.params.temperature for r in rows]
    if all(t == 0 for t in temps):
        tokens = x.argmax(-1).tolist()
    else:
        tokens = _draw(x, rows, temps, col)
    return tokens, _chosen(raw_lp, tokens, rows)


def _draw(x: torch.Tensor, rows: Sequence[Row], temps: list[float], col) -> list[int]:
    dev, vocab = x.device, x.shape[-1]
    x = x / col([t if t > 0 else 1.0 for t in temps])[:, None]
    ks = [r.params.top_k if 0 < r.params.top_k < vocab else vocab for r in rows]
    kmax = max(ks)
    if kmax < vocab:
        top, idx = x.topk(kmax, dim=-1)           # [B, kmax], sorted descending
    else:
        top, idx = x.sort(dim=-1, descending=True)
    rank = torch.arange(top.shape[-1], device=dev)[None, :]
    if min(ks) < kmax:
        top = top.masked_fill(rank >= torch.tensor(ks, device=dev)[:, None], float("-inf"))
    probs = top.softmax(-1)
    cum = probs.cumsum(-1)
    top_p = col([r.params.top_p for r in rows])[:, None]
    probs = probs.masked_fill((cum - probs > top_p) & (rank > 0), 0.0)  # keep the best always
    cum = probs.cumsum(-1)
    u = torch.cat([torch.rand(1, generator=r.gen) for r in rows]).to(dev) * cum[:, -1]
    choice = torch.searchsorted(cum, u[:, None]).clamp(max=top.shape[-1] - 1)
    tokens = idx.gather(1, choice).squeeze(1)
    if any(t == 0 for t in temps):  # greedy rows: the best token (rank 0 of the sorted top)
        tokens = torch.where(col([t == 0 for t in temps]) > 0, idx[:, 0], tokens)
    return tokens.tolist()


def _raw_logprobs(x: torch.Tensor, rows: Sequence[Row]):
    """(row indices, their log_softmax [R, V]) for the rows that ask for logprobs."""
    want = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    if not want:
        return None
    return want, x[want].log_softmax(-1)  # indexing copies: later edits of x do not reach it


def _chosen(raw_lp, tokens: list[int], rows: Sequence[Row]) -> list[RowLogprobs | None]:
    out: list[RowLogprobs | None] = [None] * len(rows)
    if raw_lp is None:
        return out
    want, lsm = raw_lp
    kmax = max(rows[i].params.logprobs for i in want)
    chosen = lsm[torch.arange(len(want), device=lsm.device), torch.tensor([tokens[i] for i in want], device=lsm.device)]
    top_v, top_i = lsm.topk(kmax, dim=-1) if kmax else (lsm[:, :0], lsm[:, :0].long())
    chosen, top_v, top_i = chosen.tolist(), top_v.tolist(), top_i.tolist()
    for j, i in enumerate(want):
        k = rows[i].params.logprobs
        out[i] = RowLogprobs(chosen[j], top_i[j][:k], top_v[j][:k])
    return out
