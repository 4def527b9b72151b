"""The engine interface: what the Serve model deployment, `zhchat chat` and eval's reply
generation use, whichever engine runs the model.

An engine (a subclass of EngineClient) provides:

- attributes: `tokenizer` (the checkpoint's), `fmt` (zhchat.dialogue.DialogueFormat over
  it), `context_length` (prompt + reply tokens at most), `vocab_size` (the model's logits,
  which may exceed len(tokenizer)), `device` (str or torch.device), `max_batch_size`
  (sequences decoded together), `error` (str | None: why the engine cannot generate).
- `submit(prompt_ids, params, sink) -> handle`: queue one request and return at once.
  `sink(delta)` is then called, from any thread, with each Delta in order; the last one has
  `finish_reason` set, or `error` (and nothing follows it). Raises PromptTooLong when the
  prompt leaves no room for a token, ValueError for parameters this model cannot take
  (a logit_bias id outside the vocabulary), EngineError when the engine is closed or broken.
- `cancel(handle)`: stop a request; its sink gets nothing more (not even a last Delta).
  Cancelling a finished or cancelled request does nothing.
- `info() -> dict`: at least {"engine": name, "context_length", "vocab_size", "device",
  "max_batch_size", "error", "stats": {"requests", "prompt_tokens", "completion_tokens",
  "cancelled", "batched"}}; counters are cumulative since the engine started (a test
  compares them before and after). `requests`: requests that started (prefill);
  `completion_tokens`: tokens sampled, stop tokens included; `cancelled`: requests
  cancelled before they finished, and only those (a finished request cancelled afterwards,
  as every stream's cleanup does, is not counted); `batched`: requests that were generated
  in one forward pass with at least one other request.
- `close()`: fail open requests with an error Delta and free the model.

Built on those: check_health, stream, astream, generate, chat_batch, chat_prompt,
text_prompt.
"""

from __future__ import annotations

import abc
import asyncio
import queue
from dataclasses import replace
from typing import Any, AsyncIterator, Callable, Iterator, Sequence

from ..dialogue import DialogueFormat, Message, PromptTooLong
from .params import SamplingParams
from .types import Completion, Delta, EngineError

Sink = Callable[[Delta], None]


class EngineClient(abc.ABC):
    tokenizer: Any
    fmt: DialogueFormat
    context_length: int
    vocab_size: int
    device: Any
    max_batch_size: int
    error: str | None = None

    @abc.abstractmethod
    def submit(self, prompt: list[int], params: SamplingParams, sink: Sink) -> Any:
        """Queue a request; `sink` is called (from another thread) with each Delta."""

    @abc.abstractmethod
    def cancel(self, handle: Any) -> None:
        """Stop a request; its sink gets nothing more."""

    @abc.abstractmethod
    def info(self) -> dict:
        """Engine name, shape, error and stats counters (see the module docstring)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Fail open requests and free the model."""

    def check_logit_bias(self, params: SamplingParams) -> None:
        """ValueError naming logit_bias when an id is not a token of this model."""
        bad = [t for t in params.logit_bias if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"logit_bias: token id {bad[0]} is not in the vocabulary (0..{self.vocab_size - 1})")

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

    # -- ways to consume a reply -----------------------------------------------------------------
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
                        d = merge_deltas(d, await asyncio.wait_for(q.get(), left))
                    except asyncio.TimeoutError:
                        break
                # Deltas that piled up meanwhile go out as one (only what is already here).
                while not d.error and not d.finish_reason and not q.empty():
                    d = merge_deltas(d, q.get_nowait())
                if d.error:
                    raise EngineError(d.error)
                yield d
                last_sent = loop.time()
                if d.finish_reason:
                    return
        finally:
            self.cancel(req)

    def generate(self, prompts: Sequence[list[int]], params: SamplingParams | Sequence[SamplingParams]) -> list[Completion]:
        """Complete many prompts at once (batched by the engine); results in input order."""
        plist = params_list(params, len(prompts))
        q: queue.Queue[tuple[int, Delta]] = queue.Queue()
        parts: list[list[Delta]] = [[] for _ in prompts]
        results: list[Completion | None] = [None] * len(prompts)
        reqs = [self.submit(p, sp, (lambda i: lambda d: q.put((i, d)))(i))
                for i, (p, sp) in enumerate(zip(prompts, plist))]
        try:
            left = len(prompts)
            while left:
                i, d = q.get()
                if d.error:
                    raise EngineError(d.error)
                parts[i].append(d)
                if d.finish_reason:
                    lps = None if plist[i].logprobs is None else [lp for x in parts[i] for lp in x.logprobs or ()]
                    results[i] = Completion("".join(x.text for x in parts[i]), d.finish_reason, d.prompt_tokens,
                                            d.completion_tokens, lps)
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

    def check_alive(self, timeout_s: float = 10.0) -> None:
        """Raise EngineError unless the engine is alive and making progress, without queueing
        behind user requests: Serve's periodic health check calls this, and a replica busy
        with a full batch and a long queue is healthy, not one to kill. Engines override it
        with a probe that jumps the queue; this default only reports a recorded failure."""
        error = self.info().get("error")
        if error:
            raise EngineError(error)

    def check_health(self, timeout_s: float = 20.0) -> None:
        """Raise EngineError unless the model can generate one token right now (a request
        like any other: it waits its turn; for warm-up, not for periodic checks)."""
        q: queue.Queue[Delta] = queue.Queue()
        prompt = self.chat_prompt([Message("user", "你好")], 1)
        self.submit(prompt, SamplingParams(max_tokens=1, temperature=0, seed=0), q.put)
        try:
            d = q.get(timeout=timeout_s)
        except queue.Empty:
            raise EngineError(f"no token within {timeout_s}s") from None
        if d.error:
            raise EngineError(d.error)


def merge_deltas(a: Delta, b: Delta) -> Delta:
    """b follows a: their text and logprobs joined, b's finish and counts (an error wins)."""
    if b.error:
        return b
    lps = a.logprobs if b.logprobs is None else b.logprobs if a.logprobs is None else a.logprobs + b.logprobs
    return replace(b, text=a.text + b.text, logprobs=lps)


def params_list(params: SamplingParams | Sequence[SamplingParams], n: int) -> list[SamplingParams]:
    plist = list(params) if isinstance(params, (list, tuple)) else [params] * n
    if len(plist) != n:
        raise ValueError(f"got {len(plist)} SamplingParams for {n} requests")
    return plist
