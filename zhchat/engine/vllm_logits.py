"""zhchat's logits controls as one vLLM (v1) logits processor.

vLLM has no n-gram blocking, and its repetition penalty counts the prompt's tokens too (a
reply could then not repeat the user's words). This processor applies, per request and in
the zhchat Engine's order, everything zhchat does to the logits before temperature and
top-k/top-p: the repetition, presence and frequency penalties over the reply's tokens,
logit_bias, the tokens that must never be sampled, and n-gram blocking over the reply. The
request asks for it with `SamplingParams.extra_args["zhchat"]` (see `request_args`); vLLM's
own penalties and logit_bias stay neutral, so each control is applied once, here.

It runs in vLLM's model-runner process (it is named to vLLM by its import path and
constructed there), on the persistent batch: `update_state` learns which request sits in
which row, `apply` edits the rows of the requests that asked for it. A row keeps a reference
to vLLM's list of the request's output tokens; new tokens are read from it in `apply`
(with async scheduling the last entry is a -1 placeholder until just before sampling).

Import-light: no zhchat imports, so the model runner imports nothing else of zhchat.
"""

from __future__ import annotations

import collections
from typing import Any

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

KEY = "zhchat"
FQCN = "zhchat.engine.vllm_logits:ZhchatLogitsProcessor"


def request_args(repetition_penalty: float = 1.0, presence_penalty: float = 0.0,
                 frequency_penalty: float = 0.0, no_repeat_ngram_size: int = 0,
                 logit_bias: dict[int, float] | None = None, never: list[int] | None = None) -> dict[str, Any]:
    """The `extra_args` entry for one request (plain types: it crosses processes)."""
    return {KEY: {
        "rep": float(repetition_penalty), "pres": float(presence_penalty), "freq": float(frequency_penalty),
        "ngram": int(no_repeat_ngram_size),
        "bias": {int(k): float(v) for k, v in (logit_bias or {}).items()},
        "never": [int(t) for t in (never or ())],
    }}


class _Row:
    """One request's view of its reply, updated from vLLM's live output list."""

    __slots__ = ("rep", "pres", "freq", "n", "bias", "never", "out", "seen", "counts", "ngrams")

    def __init__(self, args: dict, out: list[int]):
        self.rep, self.pres, self.freq = args["rep"], args["pres"], args["freq"]
        self.n = args["ngram"]
        self.bias = args["bias"]
        self.never = args["never"]
        self.out = out          # vLLM's list (a reference: it grows as the reply does)
        self.seen = 0           # tokens of `out` already counted
        self.counts: collections.Counter[int] = collections.Counter()
        self.ngrams: dict[tuple[int, ...], set[int]] = {}

    def sync(self) -> None:
        out, n = self.out, self.n
        end = len(out)
        while end > self.seen and out[end - 1] < 0:  # async-scheduling placeholders
            end -= 1
        for i in range(self.seen, end):
            self.counts[out[i]] += 1
            if n > 0 and i + 1 >= n:
                self.ngrams.setdefault(tuple(out[i + 1 - n:i]), set()).add(out[i])
        self.seen = end

    def banned_next(self) -> list[int]:
        """Tokens that would complete an n-gram already in the reply."""
        n = self.n
        if n <= 0 or self.seen < n - 1:
            return []
        key = tuple(self.out[self.seen - (n - 1):self.seen]) if n > 1 else ()
        return list(self.ngrams.get(key, ()))


def _needed(args: dict) -> bool:
    return bool(args["rep"] != 1.0 or args["pres"] or args["freq"] or args["ngram"] > 0
                or args["bias"] or args["never"])


class ZhchatLogitsProcessor(LogitsProcessor):
    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.device = device
        self.rows: dict[int, _Row] = {}

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams):
        args = (sampling_params.extra_args or {}).get(KEY)
        if args is None:
            return
        if not isinstance(args, dict) or not {"rep", "pres", "freq", "ngram", "bias", "never"} <= set(args):
            raise ValueError(f"extra_args[{KEY!r}] must come from zhchat.engine.vllm_logits.request_args()")
        if not 0 < args["rep"] <= 10:
            raise ValueError(f"repetition_penalty must be in (0, 10] (got {args['rep']!r})")
        if args["ngram"] < 0:
            raise ValueError(f"no_repeat_ngram_size must be >= 0 (got {args['ngram']!r})")

    def is_argmax_invariant(self) -> bool:
        return False  # penalties, bias and bans all change which token is best

    @staticmethod
    def _new_row(params: SamplingParams, _prompt: list[int] | None, out: list[int]) -> _Row | None:
        args = (params.extra_args or {}).get(KEY)
        if not args or not _needed(args):
            return None
        return _Row(args, out)

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self.rows, batch_update, self._new_row)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        # The zhchat Engine's order (zhchat/engine/sampler.py): penalties on the
        # reply's tokens, logit_bias, never-sampled tokens, n-gram bans. Index lists over the
        # tokens each row has used, not whole-vocabulary masks.
        rows, cols, rep, minus = [], [], [], []
        brows, bcols, bvals = [], [], []
        mrows, mcols = [], []
        for i, r in self.rows.items():
            if i >= logits.shape[0]:
                continue
            r.sync()
            if r.counts and (r.rep != 1.0 or r.pres or r.freq):
                rows += [i] * len(r.counts)
                cols += r.counts.keys()
                rep += [r.rep] * len(r.counts)
                minus += [(r.pres, r.freq * c) for c in r.counts.values()]
            if r.bias:
                brows += [i] * len(r.bias)
                bcols += r.bias.keys()
                bvals += r.bias.values()
            banned = r.banned_next()
            for ids in (r.never, banned):
                if ids:
                    mrows += [i] * len(ids)
                    mcols += ids
        dev = logits.device
        if rows:
            at = (torch.tensor(rows, device=dev), torch.tensor(cols, device=dev))
            v = logits[at]
            penalty = torch.tensor(rep, dtype=logits.dtype, device=dev)
            pres, freq = torch.tensor(minus, dtype=logits.dtype, device=dev).unbind(-1)
            logits[at] = torch.where(v > 0, v / penalty, v * penalty) - pres - freq
        if brows:
            at = (torch.tensor(brows, device=dev), torch.tensor(bcols, device=dev))
            logits[at] += torch.tensor(bvals, dtype=logits.dtype, device=dev)
        if mrows:
            logits[torch.tensor(mrows, device=dev), torch.tensor(mcols, device=dev)] = float("-inf")
        return logits
