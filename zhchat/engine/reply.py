"""One reply as it is generated: sampled token ids in, Deltas out.

Shared by both engines, so that text, deltas, finish reasons and logprobs come out the
same whichever engine picked the tokens: the detokenizer (never half a character), stop
tokens, stop strings (text that may still begin one is held back), max_tokens and the
context length, and which token log-probabilities travel with which delta.
"""

from __future__ import annotations

from typing import Sequence

from .detokenizer import Detokenizer, TokenTexts
from .params import SamplingParams
from .types import FINISH_LENGTH, FINISH_STOP, Delta, TokenLogprob


class Reply:
    def __init__(self, tokenizer, params: SamplingParams, prompt_len: int, stop_ids: set[int],
                 context_length: int, texts: TokenTexts | None = None):
        self.params = params
        self.prompt_len = prompt_len
        self.stop_ids = stop_ids
        self.context_length = context_length
        self.detok = Detokenizer(tokenizer)
        self.texts = texts if texts is not None else TokenTexts(tokenizer)
        self.out: list[int] = []   # reply tokens (stop tokens not included)
        self.text = ""             # stable text so far (after stop-string truncation)
        self.emitted = 0           # characters of `text` already sent
        self.done = False
        self.finish: str | None = None
        self._cut = False          # a stop string truncated the text
        # Logprobs not sent yet: (first character of the token's text in `text`, entry); the
        # tokens whose text the detokenizer still holds wait in _unplaced.
        self._placed: list[tuple[int, TokenLogprob]] = []
        self._unplaced: list[TokenLogprob] = []

    def logprob(self, token: int, logprob: float, top_ids: Sequence[int], top_logprobs: Sequence[float]) -> TokenLogprob:
        t = self.texts
        return TokenLogprob(t(token), float(logprob), [(t(i), float(v)) for i, v in zip(top_ids, top_logprobs)])

    def push(self, token: int, logprob: TokenLogprob | None = None) -> Delta | None:
        """Feed one sampled token; the Delta to send now, or None (nothing new to say)."""
        finish = None
        if token in self.stop_ids:
            finish = FINISH_STOP
            new = self.detok.flush()
        else:
            self.out.append(token)
            if logprob is not None:
                self._unplaced.append(logprob)
            new = self.detok.push(token)
        n_out = len(self.out) + (finish is not None)
        if new:
            start = max(len(self.text) - max((len(s) for s in self.params.stop), default=0), 0)
            self._place()
            self.text += new
            for s in self.params.stop:
                j = self.text.find(s, start)
                if j >= 0:
                    self.text, finish, self._cut = self.text[:j], FINISH_STOP, True
                    start = 0
        # The position the sampled token would take; the context has no room beyond it.
        next_pos = self.prompt_len + n_out - 1
        if finish is None and (n_out >= self.params.max_tokens or next_pos >= self.context_length):
            finish = FINISH_LENGTH
            self._place()
            self.text += self.detok.flush()
        return self._emit(finish, n_out)

    def end(self, finish: str) -> Delta:
        """End the reply here (the engine stopped it), with what the detokenizer holds."""
        self._place()
        self.text += self.detok.flush()
        return self._emit(finish, len(self.out))  # type: ignore[return-value]

    def _place(self) -> None:
        for lp in self._unplaced:
            self._placed.append((len(self.text), lp))
        self._unplaced.clear()

    def _emit(self, finish: str | None, n_out: int) -> Delta | None:
        end = len(self.text) if finish else len(self.text) - self.holdback()
        if not (end > self.emitted or finish):
            return None
        piece, self.emitted = self.text[self.emitted:end], max(end, self.emitted)
        lps = None
        if self.params.logprobs is not None:
            if finish and not self._cut:  # every token of the reply, its text out or not
                self._place()
                k = len(self._placed)
            else:  # tokens whose text begins in what has been sent
                k = next((i for i, (s, _) in enumerate(self._placed) if s >= end), len(self._placed))
            lps = [lp for _, lp in self._placed[:k]]
            self._placed = [] if finish else self._placed[k:]
        if finish:
            self.done, self.finish = True, finish
        return Delta(piece, finish, self.prompt_len, n_out, logprobs=lps)

    def holdback(self) -> int:
        """Characters at the end of `text` that could be the start of a stop string."""
        best = 0
        for s in self.params.stop:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best
