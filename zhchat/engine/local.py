"""The zhchat engine: continuous batching over a Hugging Face causal LM (GPT-2), in a
thread of this process.

One background thread owns the model and runs a loop of steps. Between steps, waiting
requests join the running batch (one batched prefill for all joiners) and finished or
cancelled ones leave it, so concurrent users share one forward pass per decode step
while each keeps its own sampling parameters, seed and stop conditions. A lone request
never waits for a batch timer: the loop wakes as soon as it arrives.

The running batch is left-padded: row i's KV cache occupies the last columns of one
DynamicCache, `attention_mask` hides the padding and explicit `position_ids` count only
real tokens, so a row computes what it would compute alone. Tokens are picked by the pure
sampler (sampler.py); text, stop strings and deltas come from reply.py.

Serving code must not import pipelines.*; neither does this module.
"""

from __future__ import annotations

import itertools
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..dialogue import SPECIAL_TOKENS, DialogueFormat
from ..runtime import autocast_dtype, best_device
from .base import EngineClient
from .detokenizer import TokenTexts
from .params import SamplingParams
from .reply import Reply
from .sampler import Row, sample
from .types import Delta, EngineError, PromptTooLong

_ids = itertools.count()


@dataclass(eq=False)
class _Request:
    prompt: list[int]
    sink: Callable[[Delta], None]
    reply: Reply
    row: Row
    id: int = field(default_factory=lambda: next(_ids))
    cancelled: bool = False
    batched: bool = False  # shared a forward pass with another request


class Engine(EngineClient):
    """Continuous-batching generation over one model. Thread-safe; one loop thread."""

    def __init__(self, model, tokenizer, context_length: int | None = None,
                 max_batch_size: int = 16, device: str | None = None):
        self.device = torch.device(device or best_device())
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        n_pos = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", 1024)
        self.context_length = min(context_length or n_pos, n_pos)
        self.fmt = DialogueFormat(tokenizer, self.context_length)
        self.max_batch_size = max_batch_size
        self.vocab_size = model.config.vocab_size
        # Every dialogue special token ends a reply: a role token means the model skipped <|end|>.
        self.stop_ids = {tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
        # Embedding rows beyond the tokenizer (padding to a round size) are never sampled.
        never = torch.zeros(self.vocab_size, dtype=torch.bool, device=self.device)
        never[len(tokenizer):] = True
        self._never = never if bool(never.any()) else None
        self._texts = TokenTexts(tokenizer)
        self._pad_id = self.fmt.eos_id
        self._cv = threading.Condition()  # its lock is an RLock
        self._inbox: Callable[[bool], None] | None = None  # see run()
        self._beat = time.monotonic()  # when the loop last finished a step (check_alive)
        self._waiting: list[_Request] = []
        self._thread: threading.Thread | None = None
        self._closed = False
        self.error: str | None = None  # last forward-pass failure, for health checks
        # Cumulative counters (base.py has the common ones). Beyond them: steps: decode steps;
        # max_batch: the most rows one decode step had; joins: requests that joined a batch
        # which was already decoding.
        self.stats = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "cancelled": 0, "batched": 0,
                      "steps": 0, "max_batch": 0, "joins": 0}
        # Called by the loop thread after every step (and after failing requests), once the
        # step's deltas have gone to their sinks: EngineProcess sends them on as one message.
        self.after_step: Callable[[], None] | None = None
        self._reset_batch()

    @classmethod
    def from_pretrained(cls, path: str, device: str | None = None, max_batch_size: int = 16,
                        context_length: int | None = None) -> "Engine":
        """Load a checkpoint folder, run folder or cloud URI (model + tokenizer, HF format)."""
        from transformers import AutoModelForCausalLM

        from ..checkpoints import local_checkpoint
        from ..tokenizer import load_tokenizer

        local = local_checkpoint(path)
        dev = device or best_device()
        # bf16 on GPUs that have it (fp16 otherwise); fp32 on CPU where bf16 is slower.
        dtype = autocast_dtype(dev) or torch.float32
        model = AutoModelForCausalLM.from_pretrained(local, dtype=dtype)
        tok = load_tokenizer(local)
        if len(tok) > model.config.vocab_size:
            raise ValueError(f"tokenizer at {path} has {len(tok)} tokens but the model only "
                             f"{model.config.vocab_size}: they do not belong together")
        return cls(model, tok, context_length=context_length, max_batch_size=max_batch_size, device=dev)

    # -- requests ----------------------------------------------------------------------------------
    def submit(self, prompt: list[int], params: SamplingParams, sink: Callable[[Delta], None]) -> _Request:
        """Queue a request; `sink` is called from the engine thread with each Delta."""
        if len(prompt) + 1 > self.context_length:
            raise PromptTooLong(f"the prompt is {len(prompt)} tokens; the context is {self.context_length}")
        self.check_logit_bias(params)
        gen = torch.Generator(device="cpu")
        gen.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
        reply = Reply(self.tokenizer, params, len(prompt), self.stop_ids, self.context_length, self._texts)
        req = _Request(list(prompt), sink, reply, Row(params, gen, reply.out))
        with self._cv:
            if self._closed:
                raise EngineError("engine is closed")
            self._waiting.append(req)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="zhchat-engine", daemon=True)
                self._thread.start()
            self._cv.notify()
        return req

    def cancel(self, req: _Request) -> None:
        req.cancelled = True

    def info(self) -> dict:
        return {"engine": "zhchat", "context_length": self.context_length, "vocab_size": self.vocab_size,
                "device": str(self.device), "max_batch_size": self.max_batch_size, "error": self.error,
                "stats": dict(self.stats)}

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    def run(self, inbox: Callable[[bool], None]) -> None:
        """Run the loop in this thread, with requests from `inbox(block)` instead of other
        threads: it is called between steps (block=False) and when there is nothing to do
        (block=True), and submits, cancels or closes through this engine. For a process that
        only runs the engine (zhchat/engine/process.py): a request's arrival then wakes the
        loop itself, not a reader thread that wakes the loop (each wake-up of an idle thread
        cost ~2 ms of time to first token on this VM)."""
        self._inbox = inbox
        self._thread = threading.current_thread()
        self._loop()

    # -- the loop ------------------------------------------------------------------------------
    def _reset_batch(self) -> None:
        self._rows: list[_Request] = []
        self._cache = None                        # DynamicCache, layers [B, H, T, D]
        self._mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)  # [B, T]
        self._next = torch.zeros(0, dtype=torch.long, device=self.device)     # [B] token to feed
        self._pos = torch.zeros(0, dtype=torch.long, device=self.device)      # [B] its position

    def check_alive(self, timeout_s: float = 10.0) -> None:
        """Alive: no recorded failure, and with work to do, a step finished within timeout_s
        (a forward pass that hangs fails this; a long queue does not)."""
        if self.error:
            raise EngineError(self.error)
        busy = self._rows or self._waiting
        if busy and time.monotonic() - self._beat > timeout_s:
            raise EngineError(f"no engine step finished in {time.monotonic() - self._beat:.0f}s")

    def _loop(self) -> None:
        while True:
            self._beat = time.monotonic()  # a step finished (or the loop is about to wait idle)
            if self._inbox is not None:
                self._inbox(False)
            with self._cv:  # an RLock: the inbox may submit from inside it
                while not self._closed and not self._waiting and not self._rows:
                    if self._inbox is None:
                        self._cv.wait()
                    else:
                        self._inbox(True)
                self._beat = time.monotonic()  # idle until now: not a stall
                if self._closed:
                    self._fail(self._waiting + self._rows, "engine closed")
                    self._step_done()
                    return
                free = self.max_batch_size - len(self._rows)
                joiners, self._waiting = self._waiting[:free], self._waiting[free:]
            for r in joiners:
                if r.cancelled:  # cancelled while it waited: never started
                    self.stats["cancelled"] += 1
            joiners = [r for r in joiners if not r.cancelled]
            try:
                with torch.inference_mode():
                    if joiners:
                        self._prefill(joiners)
                    if self._rows:
                        self._decode()
            except Exception as e:  # a broken model must not hang its callers
                self.error = f"{type(e).__name__}: {e}"
                self._fail(joiners + self._rows, self.error)
                self._reset_batch()
            self._step_done()

    def _step_done(self) -> None:
        if self.after_step is not None:
            self.after_step()

    def _fail(self, reqs: list[_Request], message: str) -> None:
        for r in reqs:
            if not r.reply.done:
                r.reply.done = True
                r.sink(Delta("", error=message, prompt_tokens=len(r.prompt), completion_tokens=len(r.reply.out)))

    def _forward(self, ids, mask, pos, cache):
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos,
                         past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :], out.past_key_values

    def _prefill(self, reqs: list[_Request]) -> None:
        """One left-padded forward pass for all joiners, then merge them into the batch."""
        from transformers import DynamicCache

        n, length = len(reqs), max(len(r.prompt) for r in reqs)
        ids = torch.full((n, length), self._pad_id, dtype=torch.long)
        mask = torch.zeros(n, length, dtype=torch.long)
        for i, r in enumerate(reqs):
            ids[i, length - len(r.prompt):] = torch.tensor(r.prompt)
            mask[i, length - len(r.prompt):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits, cache = self._forward(ids, mask, pos, DynamicCache(config=self.model.config))
        tokens, lps = sample(logits, [r.row for r in reqs], self._never)
        self.stats["requests"] += n
        self.stats["prompt_tokens"] += sum(len(r.prompt) for r in reqs)
        if self._rows:  # these requests join a batch that is already decoding
            self.stats["joins"] += n
        if n > 1:
            self._batched(reqs)
        nxt = torch.tensor(tokens, dtype=torch.long, device=self.device)
        new_pos = mask.sum(-1)
        self._merge(reqs, cache, mask, nxt, new_pos)
        self._after_step({r.id: (t, lp) for r, t, lp in zip(reqs, tokens, lps)})

    def _merge(self, reqs, cache, mask, nxt, pos) -> None:
        if self._cache is None:
            self._rows, self._cache, self._mask = list(reqs), cache, mask
            self._next, self._pos = nxt, pos
            return
        t_old, t_new = self._mask.shape[1], mask.shape[1]
        width = max(t_old, t_new)

        def lpad(x: torch.Tensor, t: int, dim: int) -> torch.Tensor:
            if t == width:
                return x
            shape = list(x.shape)
            shape[dim] = width - t
            return torch.cat([x.new_zeros(shape), x], dim=dim)

        for old, new in zip(self._cache.layers, cache.layers):
            old.keys = torch.cat([lpad(old.keys, t_old, -2), lpad(new.keys, t_new, -2)], 0)
            old.values = torch.cat([lpad(old.values, t_old, -2), lpad(new.values, t_new, -2)], 0)
        self._mask = torch.cat([lpad(self._mask, t_old, 1), lpad(mask, t_new, 1)], 0)
        self._rows += list(reqs)
        self._next = torch.cat([self._next, nxt])
        self._pos = torch.cat([self._pos, pos])

    def _decode(self) -> None:
        b = len(self._rows)
        self._mask = torch.cat([self._mask, self._mask.new_ones(b, 1)], 1)
        logits, self._cache = self._forward(self._next[:, None], self._mask, self._pos[:, None], self._cache)
        self._pos = self._pos + 1
        tokens, lps = sample(logits, [r.row for r in self._rows], self._never)
        self._next = torch.tensor(tokens, dtype=torch.long, device=self.device)
        self.stats["steps"] += 1
        self.stats["max_batch"] = max(self.stats["max_batch"], b)
        if b > 1:
            self._batched(self._rows)
        self._after_step({r.id: (t, lp) for r, t, lp in zip(self._rows, tokens, lps)})

    def _batched(self, reqs: list[_Request]) -> None:
        for r in reqs:
            if not r.batched:
                r.batched = True
                self.stats["batched"] += 1

    def _after_step(self, sampled: dict[int, tuple]) -> None:
        """Feed sampled tokens to their requests, send deltas, drop finished rows."""
        keep: list[int] = []
        for i, r in enumerate(self._rows):
            if r.cancelled:
                if not r.reply.done:
                    self.stats["cancelled"] += 1
                r.reply.done = True
                continue
            got = sampled.get(r.id)
            if got is not None:
                self._advance(r, *got)
            if not r.reply.done:
                keep.append(i)
        if len(keep) == len(self._rows):
            return
        if not keep:
            self._reset_batch()
            return
        idx = torch.tensor(keep, dtype=torch.long, device=self.device)
        self._rows = [self._rows[i] for i in keep]
        self._mask, self._next = self._mask[idx], self._next[idx]
        self._pos = self._pos[idx]
        # Columns that are padding in every remaining row are dead weight: cut them.
        cut = int((self._mask.sum(0) == 0).long().cumprod(0).sum())
        self._mask = self._mask[:, cut:]
        for layer in self._cache.layers:
            layer.keys = layer.keys[idx, :, cut:]
            layer.values = layer.values[idx, :, cut:]

    def _advance(self, r: _Request, token: int, lp) -> None:
        self.stats["completion_tokens"] += 1
        entry = None if lp is None else r.reply.logprob(token, lp.logprob, lp.top_ids, lp.top_logprobs)
        d = r.reply.push(token, entry)  # a reply token joins reply.out, which is row.out
        if token not in self.stop_ids:
            r.row.note_ngram()
        if d is not None:
            r.sink(d)
