"""Reply generation: a continuous-batching engine over a Hugging Face causal LM (GPT-2).

One background thread owns the model and runs a loop of steps. Between steps, waiting
requests join the running batch (one batched prefill for all joiners) and finished or
cancelled ones leave it, so concurrent users share one forward pass per decode step
while each keeps its own sampling parameters, seed and stop conditions. A lone request
never waits for a batch timer: the loop wakes as soon as it arrives.

The running batch is left-padded: row i's KV cache occupies the last columns of one
DynamicCache, `attention_mask` hides the padding and explicit `position_ids` count only
real tokens, so a row computes what it would compute alone.

Used by `zhchat chat` (stream), evaluation (chat_batch) and the Serve model deployment
(astream). Serving code must not import pipelines.*; neither does this module.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import os
import queue
import secrets
import tempfile
import threading
from dataclasses import dataclass, field, replace
from typing import AsyncIterator, Callable, Iterator, Sequence

import torch

from .runtime import autocast_dtype, best_device
from .dialogue import SPECIAL_TOKENS, DialogueFormat, Message, PromptTooLong

__all__ = [
    "SamplingParams", "Delta", "Completion", "Engine", "EngineError", "PromptTooLong",
    "local_checkpoint",
]

FINISH_STOP = "stop"      # <|end|>, <|endoftext|>, another role token, or a stop string
FINISH_LENGTH = "length"  # max_tokens or the context length reached


@dataclass
class SamplingParams:
    """Per-request sampling. Defaults match zhchat.config.GenerationDefaults.

    Penalties look at the reply generated so far (not the prompt): a reply may repeat the
    user's words, but not itself. temperature=0 is greedy; top_k=0 and top_p=1 disable them.
    """

    max_tokens: int = 64
    temperature: float = 0.8
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float = 1.2
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    no_repeat_ngram_size: int = 3
    seed: int | None = None
    stop: Sequence[str] = ()

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(s for s in self.stop if s)
        checks = [
            ("max_tokens", self.max_tokens >= 1, "must be >= 1"),
            ("temperature", 0 <= self.temperature <= 2, "must be in [0, 2]"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("top_k", self.top_k >= 0, "must be >= 0"),
            ("repetition_penalty", 0 < self.repetition_penalty <= 10, "must be in (0, 10]"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "must be in [-2, 2]"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "must be in [-2, 2]"),
            ("no_repeat_ngram_size", self.no_repeat_ngram_size >= 0, "must be >= 0"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f"{name} {why} (got {getattr(self, name)!r})")

    @classmethod
    def from_defaults(cls, defaults, **overrides) -> "SamplingParams":
        """Fill unset (None) fields from a GenerationDefaults section."""
        base = {k: getattr(defaults, k) for k in (
            "max_tokens", "temperature", "top_p", "top_k", "repetition_penalty",
            "no_repeat_ngram_size") if hasattr(defaults, k)}
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)


@dataclass
class Delta:
    """A piece of a streamed reply. The last one has finish_reason set (or error)."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


@dataclass
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class EngineError(RuntimeError):
    """The model failed to generate (an exception in the forward pass, non-finite logits)."""


# -- per-request state ---------------------------------------------------------------------


class _Detokenizer:
    """Incremental decoding that never emits half a character.

    Byte-level BPE can split a UTF-8 character across tokens; decoding such a prefix gives
    U+FFFD. New text is released only when the decoded window does not end in U+FFFD
    (the character is complete); bytes that never form a character are dropped.
    """

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # decode window start (context for tokenizers whose decoding depends on it)
        self.read = 0    # ids before this have been released

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix:self.read])
        now = self._decode(self.ids[self.prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(before):].replace("\ufffd", "")
        return ""

    def flush(self) -> str:
        before = self._decode(self.ids[self.prefix:self.read])
        now = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return now[len(before):].replace("\ufffd", "")


_ids = itertools.count()


@dataclass(eq=False)
class _Request:
    prompt: list[int]
    params: SamplingParams
    sink: Callable[[Delta], None]
    detok: _Detokenizer
    gen: torch.Generator
    id: int = field(default_factory=lambda: next(_ids))
    out: list[int] = field(default_factory=list)
    text: str = ""          # stable text so far (after stop-string truncation)
    emitted: int = 0        # characters of `text` already sent
    ngrams: dict = field(default_factory=dict)
    cancelled: bool = False
    done: bool = False

    def banned_next(self) -> list[int]:
        """Tokens that would complete an n-gram already in the reply."""
        n = self.params.no_repeat_ngram_size
        if n <= 0 or len(self.out) < n - 1:
            return []
        key = tuple(self.out[len(self.out) - (n - 1):])
        return list(self.ngrams.get(key, ()))

    def note_ngram(self) -> None:
        n = self.params.no_repeat_ngram_size
        if n > 0 and len(self.out) >= n:
            gram = self.out[-n:]
            self.ngrams.setdefault(tuple(gram[:-1]), set()).add(gram[-1])

    def holdback(self) -> int:
        """Characters at the end of `text` that could be the start of a stop string."""
        best = 0
        for s in self.params.stop:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best


# -- checkpoints -----------------------------------------------------------------------------


def local_checkpoint(path: str) -> str:
    """A local folder holding the model and tokenizer for `path`.

    A run folder maps to its best checkpoint (zhchat.checkpoints.resolve_checkpoint, when
    present); a cloud URI (s3://, gs://, ...) is downloaded to a temporary folder first.
    """
    from .config import is_uri

    try:
        from .checkpoints import resolve_checkpoint  # written by the training stage
    except ImportError:
        resolve_checkpoint = None
    if resolve_checkpoint is not None:
        path = str(resolve_checkpoint(path))
    if not is_uri(path):
        p = os.path.abspath(os.path.expanduser(path))
        if not os.path.isdir(p):
            raise FileNotFoundError(f"model checkpoint folder does not exist: {path}")
        return p
    import pyarrow.fs as pafs

    fs, src = pafs.FileSystem.from_uri(path)
    if fs.get_file_info(src).type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"model checkpoint not found: {path}")
    dst = tempfile.mkdtemp(prefix="zhchat-model-")
    pafs.copy_files(src, dst, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return dst


# -- engine ----------------------------------------------------------------------------------


class EngineClient:
    """The request side of an engine, built on submit() and cancel(): prompts, streams,
    batches, health checks. Engine runs the model in a thread of this process;
    zhchat.engine_process.EngineProcess runs it in a child process (for servers)."""

    fmt: DialogueFormat
    context_length: int

    def submit(self, prompt: list[int], params: SamplingParams, sink: Callable[[Delta], None]):
        """Queue a request; `sink` is called (from another thread) with each Delta."""
        raise NotImplementedError

    def cancel(self, req) -> None:
        raise NotImplementedError

    # -- prompts -----------------------------------------------------------------------------
    def chat_prompt(self, messages: Sequence[Message], max_tokens: int) -> list[int]:
        """Prompt ids for a conversation (raises PromptTooLong, ValueError)."""
        return self.fmt.build_prompt(messages, max_tokens)

    def text_prompt(self, text: str, max_tokens: int) -> list[int]:
        """Prompt ids for raw text continuation; the text is only text (no special tokens)."""
        ids = [self.fmt.eos_id] + self.fmt.encode_text(text)
        if len(ids) + max_tokens > self.context_length:
            raise PromptTooLong(
                f"the prompt is {len(ids)} tokens; with max_tokens={max_tokens} it exceeds "
                f"the context of {self.context_length} tokens")
        return ids

    def stream(self, prompt: list[int], params: SamplingParams) -> Iterator[Delta]:
        """Blocking iterator of Deltas (for the terminal chat)."""
        q: queue.Queue[Delta] = queue.Queue()
        req = self.submit(prompt, params, q.put)
        try:
            while True:
                d = q.get()
                if d.error:
                    raise EngineError(d.error)
                yield d
                if d.finish_reason:
                    return
        finally:
            self.cancel(req)

    async def astream(self, prompt: list[int], params: SamplingParams,
                      min_interval_s: float = 0.0) -> AsyncIterator[Delta]:
        """Async iterator of Deltas (for the Serve deployment); cancels on early exit.

        The first delta goes out as soon as it exists; later ones at most every
        `min_interval_s`, each carrying what arrived in between, and the last at once.
        Under load every message through Serve costs more CPU than the text in it (at 16
        streams, more than the model itself: bench/serve.py), and a reader does not see a
        difference between 20 updates a second and 60."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[Delta] = asyncio.Queue()
        req = self.submit(prompt, params, lambda d: loop.call_soon_threadsafe(q.put_nowait, d))
        last_sent = None
        try:
            while True:
                d = await q.get()
                # Until the interval is up, more text joins this delta; the end of the reply
                # (or an error) is never held back.
                while last_sent is not None and not (d.error or d.finish_reason):
                    left = last_sent + min_interval_s - loop.time()
                    if left <= 0:
                        break
                    try:
                        d = _merge_deltas(d, await asyncio.wait_for(q.get(), left))
                    except asyncio.TimeoutError:
                        break
                # Deltas that piled up meanwhile go out as one (only what is already here).
                while not d.error and not d.finish_reason and not q.empty():
                    d = _merge_deltas(d, q.get_nowait())
                if d.error:
                    raise EngineError(d.error)
                yield d
                last_sent = loop.time()
                if d.finish_reason:
                    return
        finally:
            self.cancel(req)

    def generate(self, prompts: Sequence[list[int]], params: SamplingParams | Sequence[SamplingParams]) -> list[Completion]:
        """Complete many prompts at once (batched by the loop); results in input order."""
        plist = params_list(params, len(prompts))
        q: queue.Queue[tuple[int, Delta]] = queue.Queue()
        parts: list[list[str]] = [[] for _ in prompts]
        results: list[Completion | None] = [None] * len(prompts)
        reqs = [self.submit(p, sp, (lambda i: lambda d: q.put((i, d)))(i))
                for i, (p, sp) in enumerate(zip(prompts, plist))]
        try:
            left = len(prompts)
            while left:
                i, d = q.get()
                if d.error:
                    raise EngineError(d.error)
                parts[i].append(d.text)
                if d.finish_reason:
                    results[i] = Completion("".join(parts[i]), d.finish_reason, d.prompt_tokens, d.completion_tokens)
                    left -= 1
        finally:
            for r in reqs:
                self.cancel(r)
        return results  # type: ignore[return-value]

    def chat_completions(self, conversations: Sequence[Sequence[Message]],
                         params: SamplingParams | Sequence[SamplingParams]) -> list[Completion]:
        plist = params_list(params, len(conversations))
        prompts = []
        for i, (msgs, sp) in enumerate(zip(conversations, plist)):
            try:
                prompts.append(self.chat_prompt(msgs, sp.max_tokens))
            except ValueError as e:
                raise type(e)(f"conversation {i}: {e}") from None
        return self.generate(prompts, plist)

    def chat_batch(self, conversations: Sequence[Sequence[Message]],
                   params: SamplingParams | Sequence[SamplingParams]) -> list[str]:
        """Reply text for each conversation (each ends with a user message)."""
        return [c.text for c in self.chat_completions(conversations, params)]

    def check_health(self, timeout_s: float = 20.0) -> None:
        """Raise EngineError unless the model can generate one token right now."""
        q: queue.Queue[Delta] = queue.Queue()
        prompt = self.chat_prompt([Message("user", "你好")], 1)
        self.submit(prompt, SamplingParams(max_tokens=1, temperature=0, seed=0), q.put)
        try:
            d = q.get(timeout=timeout_s)
        except queue.Empty:
            raise EngineError(f"no token within {timeout_s}s") from None
        if d.error:
            raise EngineError(d.error)


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
        self._invalid = torch.zeros(self.vocab_size, dtype=torch.bool, device=self.device)
        self._invalid[len(tokenizer):] = True
        self._has_invalid = bool(self._invalid.any())
        self._pad_id = self.fmt.eos_id
        self._cv = threading.Condition()
        self._inbox: Callable[[bool], None] | None = None  # see run()
        self._waiting: list[_Request] = []
        self._thread: threading.Thread | None = None
        self._closed = False
        self.error: str | None = None  # last forward-pass failure, for health checks
        self.stats = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "steps": 0, "max_batch": 0}
        # Called by the loop thread after every step (and after failing requests), once the
        # step's deltas have gone to their sinks: EngineProcess sends them on as one message.
        self.after_step: Callable[[], None] | None = None
        self._reset_batch()

    @classmethod
    def from_pretrained(cls, path: str, device: str | None = None, max_batch_size: int = 16,
                        context_length: int | None = None) -> "Engine":
        """Load a checkpoint folder, run folder or cloud URI (model + tokenizer, HF format)."""
        from transformers import AutoModelForCausalLM

        from .tokenizer import load_tokenizer

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
        gen = torch.Generator(device="cpu")
        gen.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
        req = _Request(list(prompt), params, sink, _Detokenizer(self.tokenizer), gen)
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
        only runs the engine (zhchat/engine_process.py): a request's arrival then wakes the
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

    def _loop(self) -> None:
        while True:
            if self._inbox is not None:
                self._inbox(False)
            with self._cv:  # an RLock: the inbox may submit from inside it
                while not self._closed and not self._waiting and not self._rows:
                    if self._inbox is None:
                        self._cv.wait()
                    else:
                        self._inbox(True)
                if self._closed:
                    self._fail(self._waiting + self._rows, "engine closed")
                    self._step_done()
                    return
                free = self.max_batch_size - len(self._rows)
                joiners, self._waiting = self._waiting[:free], self._waiting[free:]
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
            if not r.done:
                r.done = True
                r.sink(Delta("", error=message, prompt_tokens=len(r.prompt), completion_tokens=len(r.out)))

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
        tokens = self._sample(logits, reqs)
        self.stats["requests"] += n
        self.stats["prompt_tokens"] += sum(len(r.prompt) for r in reqs)
        nxt = torch.tensor(tokens, dtype=torch.long, device=self.device)
        new_pos = mask.sum(-1)
        self._merge(reqs, cache, mask, nxt, new_pos)
        self._after_step(tokens_by_row={r.id: t for r, t in zip(reqs, tokens)})

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
        tokens = self._sample(logits, self._rows)
        self._next = torch.tensor(tokens, dtype=torch.long, device=self.device)
        self.stats["steps"] += 1
        self.stats["max_batch"] = max(self.stats["max_batch"], b)
        self._after_step(tokens_by_row={r.id: t for r, t in zip(self._rows, tokens)})

    def _sample(self, logits: torch.Tensor, reqs: list[_Request]) -> list[int]:
        """Next token per row with that row's penalties, bans, temperature, top-k/p and seed.

        Penalties touch only the tokens a row has generated (a few dozen), not its whole
        vocabulary row: whole-row masks for three penalties were a fifth of a decode step."""
        logits = logits.float()  # [B, V]
        if not torch.isfinite(logits.sum(-1)).all():  # any inf or nan makes its row's sum one
            raise EngineError("the model produced non-finite logits")
        dev = logits.device
        col = lambda xs: torch.tensor(xs, dtype=torch.float32, device=dev)  # noqa: E731
        rows, cols, rep, minus = [], [], [], []
        for i, r in enumerate(reqs):
            p = r.params
            if r.out and (p.repetition_penalty != 1 or p.presence_penalty or p.frequency_penalty):
                counts = collections.Counter(r.out)
                rows += [i] * len(counts)
                cols += counts.keys()
                rep += [p.repetition_penalty] * len(counts)
                minus += [(p.presence_penalty, p.frequency_penalty * n) for n in counts.values()]
        if rows:
            at = (torch.tensor(rows, device=dev), torch.tensor(cols, device=dev))
            v, penalty = logits[at], col(rep)
            pres, freq = col(minus).unbind(-1)
            logits[at] = torch.where(v > 0, v / penalty, v * penalty) - pres - freq
        if self._has_invalid:
            logits = logits.masked_fill(self._invalid, float("-inf"))
        for i, r in enumerate(reqs):
            banned = r.banned_next()
            if banned:
                logits[i, banned] = float("-inf")
        temps = [r.params.temperature for r in reqs]
        if all(t == 0 for t in temps):
            return logits.argmax(-1).tolist()
        logits = logits / col([t if t > 0 else 1.0 for t in temps])[:, None]
        ks = [r.params.top_k if 0 < r.params.top_k < logits.shape[-1] else logits.shape[-1] for r in reqs]
        kmax = max(ks)
        if kmax < logits.shape[-1]:
            top, idx = logits.topk(kmax, dim=-1)           # [B, kmax], sorted descending
        else:
            top, idx = logits.sort(dim=-1, descending=True)
        rank = torch.arange(top.shape[-1], device=dev)[None, :]
        if min(ks) < kmax:
            top = top.masked_fill(rank >= torch.tensor(ks, device=dev)[:, None], float("-inf"))
        probs = top.softmax(-1)
        cum = probs.cumsum(-1)
        top_p = col([r.params.top_p for r in reqs])[:, None]
        probs = probs.masked_fill((cum - probs > top_p) & (rank > 0), 0.0)  # keep the best always
        cum = probs.cumsum(-1)
        u = torch.cat([torch.rand(1, generator=r.gen) for r in reqs]).to(dev) * cum[:, -1]
        choice = torch.searchsorted(cum, u[:, None]).clamp(max=top.shape[-1] - 1)
        tokens = idx.gather(1, choice).squeeze(1)
        if any(t == 0 for t in temps):  # greedy rows: the best token (rank 0 of the sorted top)
            tokens = torch.where(col([t == 0 for t in temps]) > 0, idx[:, 0], tokens)
        return tokens.tolist()

    def _after_step(self, tokens_by_row: dict[int, int]) -> None:
        """Feed sampled tokens to their requests, send deltas, drop finished rows."""
        keep: list[int] = []
        for i, r in enumerate(self._rows):
            if r.cancelled:
                r.done = True
                continue
            t = tokens_by_row.get(r.id)
            if t is not None:
                self._advance(r, t, int(self._pos[i]))
            if not r.done:
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

    def _advance(self, r: _Request, token: int, next_pos: int) -> None:
        finish = None
        if token in self.stop_ids:
            finish = FINISH_STOP
            new = r.detok.flush()
        else:
            r.out.append(token)
            r.note_ngram()
            new = r.detok.push(token)
        self.stats["completion_tokens"] += 1
        n_out = len(r.out) + (finish is not None)
        if new:
            start = max(len(r.text) - max((len(s) for s in r.params.stop), default=0), 0)
            r.text += new
            for s in r.params.stop:
                j = r.text.find(s, start)
                if j >= 0:
                    r.text, finish = r.text[:j], FINISH_STOP
                    start = 0
        if finish is None and (n_out >= r.params.max_tokens or next_pos >= self.context_length):
            finish = FINISH_LENGTH
            r.text += r.detok.flush()
        end = len(r.text) if finish else len(r.text) - r.holdback()
        if end > r.emitted or finish:
            piece, r.emitted = r.text[r.emitted:end], max(end, r.emitted)
            if finish:
                r.done = True
            r.sink(Delta(piece, finish, len(r.prompt), n_out))


def _merge_deltas(a: Delta, b: Delta) -> Delta:
    """b follows a: their text joined, b's finish and counts (an error wins)."""
    if b.error:
        return b
    return replace(b, text=a.text + b.text)


def params_list(params: SamplingParams | Sequence[SamplingParams], n: int) -> list[SamplingParams]:
    plist = list(params) if isinstance(params, (list, tuple)) else [replace(params) for _ in range(n)]
    if len(plist) != n:
        raise ValueError(f"got {len(plist)} SamplingParams for {n} requests")
    return plist
