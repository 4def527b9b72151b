"""The vLLM engine: vLLM's async engine (v1 AsyncLLM) behind zhchat's EngineClient.

Chosen by `serve.engine: vllm`. It runs inside whatever process opens it (a Serve model
replica, `zhchat chat`, an eval actor), so zhchat's ingress, API keys, blocklist, metrics,
autoscaling, error schema and special-token safety stay zhchat's; vLLM's engine core and
its model worker run in processes of their own that vLLM spawns (a script that opens this
engine needs `if __name__ == "__main__":`).

Token ids go in and zhchat's deltas come out. vLLM only picks tokens: its detokenizer is
off, and every token goes through the zhchat Engine's own steps (zhchat's detokenizer,
stop tokens, stop strings with hold-back, max_tokens, finish reasons), so the text, the
deltas and the finish reasons are the zhchat Engine's. Sampling: temperature, top-k,
top-p and seed are vLLM's (the same definitions); repetition/presence/frequency penalties
over the reply only, logit_bias, n-gram blocking and the never-sampled tokens are one logits
processor of zhchat's (zhchat/engine/vllm_logits.py) with vLLM's own penalties left neutral
(vLLM's repetition penalty counts the prompt too). Logprobs are vLLM's raw logprobs (before
any penalty), as zhchat's are.

vLLM's AsyncLLM lives on an asyncio loop in a background thread of this process; submit()
and cancel() hand work to it from any thread, and sinks are called from it.

CPU: fp32 (bf16 is slower without AMX), a KV cache of VLLM_CPU_KVCACHE_SPACE GiB (default
1), and `threads` OpenMP threads for the model worker: bound to `threads` CPUs of this
process's affinity (VLLM_CPU_OMP_THREADS_BIND), unless the environment sets the binding.
GPU: zhchat.runtime.autocast_dtype (bf16 at compute capability >= 8, else fp16).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import tempfile
import threading
from dataclasses import dataclass
from typing import Any, Callable

from ..dialogue import SPECIAL_TOKENS, DialogueFormat
from .base import EngineClient
from .detokenizer import TokenTexts
from .params import SamplingParams
from .reply import Reply
from .types import FINISH_LENGTH, Delta, EngineError, PromptTooLong

__all__ = ["VLLMEngine", "vllm_available"]

_ids = itertools.count()


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:
        return False
    return True


@dataclass(eq=False)
class _Stream:
    """One request: its prompt, its sink and the reply as zhchat builds it (reply.Reply)."""

    prompt: list[int]
    params: SamplingParams
    sink: Callable[[Delta], None]
    reply: Reply
    rid: str
    started: bool = False    # vLLM prefilled it (its first token came back)
    batched: bool = False    # generated while another request was running (stats["batched"])
    cancelled: bool = False  # cancel() was called (from any thread)
    finished: bool = False   # its last Delta (or error) went out, or it was cancelled first
    task: asyncio.Task | None = None

    @property
    def done(self) -> bool:
        return self.finished


@contextlib.contextmanager
def _environ(values: dict[str, str]):
    """Set environment variables while vLLM spawns its processes (they inherit them)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _allowed_cpus() -> list[int]:
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def _cpu_list(n: int) -> str:
    """The first `n` CPUs of this process's affinity, as VLLM_CPU_OMP_THREADS_BIND writes them."""
    allowed = _allowed_cpus()
    return ",".join(str(c) for c in allowed[:max(1, min(n, len(allowed)))])


CPU_CLAIMS = os.path.join(tempfile.gettempdir(), "zhchat-vllm-cpus.json")


def claim_cpus(n: int, owner: str, path: str = CPU_CLAIMS) -> list[int]:
    """`n` CPUs for one engine's model worker, as few of them claimed by other vllm engines
    on this machine as there are.

    vLLM binds its CPU worker's OpenMP threads to fixed CPUs (pinned threads were ~15% faster
    here than unpinned ones), but each engine only sees its own process: two Serve replicas
    on one node would both bind CPU 0. Engines record their CPUs in one file (under a file
    lock, before vLLM starts, so a replica starting at the same moment sees the claim);
    claims of processes that have exited do not count. `owner` is "PID:anything"."""
    import fcntl

    allowed = _allowed_cpus()
    n = max(1, min(n, len(allowed)))
    with open(path + ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            with open(path) as f:
                claims = dict(json.load(f))
        except (OSError, ValueError):
            claims = {}
        claims = {k: cpus for k, cpus in claims.items() if k != owner and _alive(k)}
        load = {c: 0 for c in allowed}
        for cpus in claims.values():
            for c in cpus:
                if c in load:
                    load[c] += 1
        chosen = sorted(sorted(allowed, key=lambda c: (load[c], c))[:n])
        claims[owner] = chosen
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(claims, f)
        os.replace(tmp, path)
    return chosen


def release_cpus(owner: str, path: str = CPU_CLAIMS) -> None:
    import fcntl

    with contextlib.suppress(OSError, ValueError), open(path + ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with open(path) as f:
            claims = json.load(f)
        if claims.pop(owner, None) is not None:
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(claims, f)
            os.replace(tmp, path)


def _alive(owner: str) -> bool:
    try:
        os.kill(int(owner.split(":")[0]), 0)
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:
        return True
    return True


def _dtype_name(dtype) -> str:
    import torch

    if isinstance(dtype, str):
        return {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(dtype, dtype)
    return {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]


class VLLMEngine(EngineClient):
    """zhchat's engine interface over vLLM's AsyncLLM (see the module docstring)."""

    def __init__(self, path: str, max_batch_size: int = 16, threads: int = 1, dtype=None,
                 device: str | None = None, context_length: int | None = None,
                 kv_cache_gib: float | None = None, gpu_memory_utilization: float | None = None,
                 enforce_eager: bool | None = None, start_timeout_s: float = 900.0):
        from ..checkpoints import local_checkpoint
        from ..runtime import autocast_dtype, best_device
        from ..tokenizer import load_tokenizer

        local = local_checkpoint(path)
        with open(os.path.join(local, "config.json")) as f:
            hf_config = json.load(f)
        n_pos = hf_config.get("n_positions") or hf_config.get("max_position_embeddings") or 1024
        self.context_length = min(context_length or n_pos, n_pos)
        self.vocab_size = int(hf_config["vocab_size"])
        self.tokenizer = load_tokenizer(local)
        if len(self.tokenizer) > self.vocab_size:
            raise ValueError(f"tokenizer at {path} has {len(self.tokenizer)} tokens but the model only "
                             f"{self.vocab_size}: they do not belong together")
        self.fmt = DialogueFormat(self.tokenizer, self.context_length)
        self.max_batch_size = max_batch_size
        self.device = device or best_device()
        if dtype is None:  # zhchat's precision rule: fp32 on CPU, bf16 at CC >= 8, fp16 below
            dtype = autocast_dtype(self.device) or "float32"
        self.dtype = _dtype_name(dtype)
        # As the zhchat Engine: every dialogue special token ends a reply (a role token means
        # the model skipped <|end|>); embedding rows beyond the tokenizer are never sampled.
        self.stop_ids = {self.tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
        self.never_ids = list(range(len(self.tokenizer), self.vocab_size))
        self._texts = TokenTexts(self.tokenizer)
        self._open: set[_Stream] = set()  # requests the loop thread is serving
        self._error: str | None = None
        self.stats = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "cancelled": 0, "batched": 0}
        self._closed = False
        self._llm = None
        self._pid = os.getpid()
        self._cpu_claim: str | None = None  # this engine's entry in CPU_CLAIMS

        import vllm

        self.vllm_version = vllm.__version__
        env = {"VLLM_WORKER_MULTIPROC_METHOD": "spawn",  # never fork a process with threads
               "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
        env = {k: os.environ.get(k, v) for k, v in env.items()}
        args: dict[str, Any] = dict(
            model=local, dtype=self.dtype, max_model_len=self.context_length, max_num_seqs=max_batch_size,
            skip_tokenizer_init=True,  # zhchat tokenizes and detokenizes
            disable_log_stats=True, enable_log_requests=False, seed=0,
            # zhchat's logits controls (vllm_logits.py), by import path: vLLM's model runner
            # process imports it there.
            logits_processors=["zhchat.engine.vllm_logits:ZhchatLogitsProcessor"],
        )
        if self.device.startswith("cuda"):
            if gpu_memory_utilization is not None:
                args["gpu_memory_utilization"] = gpu_memory_utilization
            # The logits processor is written against the v1 model runner's interface
            # (the one the CPU build runs and the tests exercise).
            env["VLLM_USE_V2_MODEL_RUNNER"] = os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "0")
        else:
            env["VLLM_CPU_KVCACHE_SPACE"] = os.environ.get("VLLM_CPU_KVCACHE_SPACE", str(int(kv_cache_gib or 1)))
            bind = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
            if bind is None:
                self._cpu_claim = f"{os.getpid()}:{id(self)}"
                bind = ",".join(map(str, claim_cpus(threads, self._cpu_claim)))
            env["VLLM_CPU_OMP_THREADS_BIND"] = bind
            if env["VLLM_CPU_OMP_THREADS_BIND"] == "nobind":
                env["OMP_NUM_THREADS"] = str(threads)
        if enforce_eager is not None:
            args["enforce_eager"] = enforce_eager
        self.engine_args = args

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="zhchat-vllm", daemon=True)
        self._thread.start()
        try:
            with _environ(env):
                fut = asyncio.run_coroutine_threadsafe(self._start(args), self._loop)
                fut.result(timeout=start_timeout_s)
            self._warm_up()
        except BaseException:
            self.close()
            raise

    async def _start(self, args: dict) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        # Built on this loop, so vLLM's output handler task runs here.
        self._llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**args))

    def _warm_up(self) -> None:
        """One request of each kind vLLM compiles something for on first use (logprobs'
        rank count is a torch.compile'd function: 2.7 s on the first request here)."""
        prompt = [self.fmt.eos_id] + self.fmt.encode_text("你好")
        kinds = [SamplingParams(max_tokens=2, temperature=0, logprobs=1),
                 SamplingParams(max_tokens=2, temperature=1.0, top_k=5, top_p=0.9, seed=0, logprobs=1)]
        self.generate([prompt] * len(kinds), kinds)
        self.stats = {k: 0 for k in self.stats}

    # -- EngineClient ----------------------------------------------------------------------------
    @property
    def error(self) -> str | None:
        """Why this engine cannot generate: a failure seen by a request, or vLLM's engine
        core gone (vLLM notices a dead engine process itself)."""
        if self._error is None and self._llm is not None and self._llm.errored:
            self._error = "the vLLM engine core process died"
        return self._error

    @property
    def engine_pid(self) -> int | None:
        """The pid of vLLM's engine core process (its model worker is a child of it)."""
        with contextlib.suppress(Exception):
            return self._llm.engine_core.resources.engine_manager.processes[0].pid
        return None

    def submit(self, prompt: list[int], params: SamplingParams, sink: Callable[[Delta], None]) -> _Stream:
        if len(prompt) + 1 > self.context_length:
            raise PromptTooLong(f"the prompt is {len(prompt)} tokens; the context is {self.context_length}")
        self.check_logit_bias(params)
        if self._closed:
            raise EngineError("engine is closed")
        if self.error:
            raise EngineError(self.error)
        reply = Reply(self.tokenizer, params, len(prompt), self.stop_ids, self.context_length, self._texts)
        h = _Stream(list(prompt), params, sink, reply, f"zhchat-{next(_ids)}")
        self._loop.call_soon_threadsafe(self._begin, h)
        return h

    def cancel(self, h: _Stream) -> None:
        if h.finished or h.cancelled:
            return
        h.cancelled = True  # the loop thread sends nothing more from now on
        if not self._closed:
            self._loop.call_soon_threadsafe(self._cancel, h)

    def check_alive(self, timeout_s: float = 10.0) -> None:
        """vLLM's own health check (its engine core is up), run on this engine's event loop,
        so a loop that stopped answering fails too; neither waits behind queued requests."""
        if self.error or self._closed or not self._thread.is_alive():
            raise EngineError(self.error or "the vLLM engine is closed")
        try:
            asyncio.run_coroutine_threadsafe(self._llm.check_health(), self._loop).result(timeout=timeout_s)
        except Exception as e:  # noqa: BLE001 - any failure of the probe is an unhealthy engine
            raise EngineError(f"vLLM is not healthy: {type(e).__name__}: {e}") from None

    def info(self) -> dict:
        return {"engine": "vllm", "vllm_version": self.vllm_version, "device": str(self.device), "dtype": self.dtype,
                "context_length": self.context_length, "vocab_size": self.vocab_size,
                "max_batch_size": self.max_batch_size, "error": self.error, "stats": dict(self.stats),
                "engine_pid": self.engine_pid}

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._cpu_claim:
            release_cpus(self._cpu_claim)
        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=60)
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._thread is not threading.current_thread():
                self._thread.join(timeout=10)

    async def _shutdown(self) -> None:
        for h in list(self._open):
            if h.task is not None:
                h.task.cancel()
            self._fail(h, "engine closed")
        llm, self._llm = self._llm, None
        if llm is not None:
            if llm.output_handler is not None:  # else it logs the engine core's exit as a failure
                llm.output_handler.cancel()
            llm.shutdown()

    def __del__(self):  # an engine dropped without close() must not leave vLLM's processes
        try:
            if not self._closed and os.getpid() == self._pid:
                self.close()
        except Exception:  # interpreter shutdown: modules may be gone already
            pass

    # -- the loop thread -------------------------------------------------------------------------
    def _begin(self, h: _Stream) -> None:
        if h.cancelled:
            self._cancel(h)
            return
        self._open.add(h)
        h.task = self._loop.create_task(self._serve(h))

    def _cancel(self, h: _Stream) -> None:
        if h.finished:  # it ended before the cancel arrived
            return
        h.finished = True
        self.stats["cancelled"] += 1
        self._open.discard(h)
        if h.task is not None:
            h.task.cancel()  # vLLM's generate() aborts the request on CancelledError

    def _vllm_params(self, p: SamplingParams, prompt_len: int):
        from vllm import SamplingParams as VParams
        from vllm.sampling_params import RequestOutputKind

        from . import vllm_logits

        top_k = p.top_k if 0 < p.top_k < self.vocab_size else 0
        return VParams(
            n=1, temperature=p.temperature, top_p=p.top_p, top_k=top_k, seed=p.seed,
            # vLLM stops at its max_model_len itself; the reply's own limits are Reply's.
            max_tokens=max(1, min(p.max_tokens, self.context_length - prompt_len)),
            stop_token_ids=sorted(self.stop_ids), detokenize=False, output_kind=RequestOutputKind.DELTA,
            logprobs=p.logprobs,
            extra_args=vllm_logits.request_args(
                p.repetition_penalty, p.presence_penalty, p.frequency_penalty, p.no_repeat_ngram_size,
                p.logit_bias, self.never_ids),
        )

    def _logprob(self, h: _Stream, token: int, entries: dict):
        """vLLM's logprobs of one position ({id: Logprob(logprob, rank)}: the sampled token
        and the k best, raw) as zhchat's TokenLogprob."""
        k = h.params.logprobs
        top = sorted(((lp.rank, i, lp.logprob) for i, lp in entries.items() if lp.rank is not None and lp.rank <= k))
        return h.reply.logprob(token, entries[token].logprob, [i for _, i, _ in top], [v for _, _, v in top])

    async def _serve(self, h: _Stream) -> None:
        llm = self._llm
        if llm is None:
            self._fail(h, "engine closed")
            return
        try:
            sp = self._vllm_params(h.params, len(h.prompt))
            outputs = llm.generate({"type": "token", "prompt_token_ids": h.prompt}, sp, h.rid)
        except Exception as e:
            self._fail(h, f"{type(e).__name__}: {e}")
            return
        try:
            async for out in outputs:
                if not h.started:
                    h.started = True
                    self.stats["requests"] += 1
                    self.stats["prompt_tokens"] += len(h.prompt)
                if not h.batched and any(o is not h and o.started and not o.done for o in self._open):
                    h.batched = True  # vLLM's scheduler runs every open request in one step
                    self.stats["batched"] += 1
                o = out.outputs[0]
                for j, token in enumerate(o.token_ids):
                    if h.cancelled or h.finished:
                        break
                    self.stats["completion_tokens"] += 1
                    lp = self._logprob(h, token, o.logprobs[j]) if o.logprobs else None
                    self._send(h, h.reply.push(token, lp))
                if h.cancelled or h.finished:
                    break
                if out.finished:
                    # vLLM ended it before Reply did: the context is full (vLLM stops one token
                    # before the zhchat Engine there: it never samples past max_model_len),
                    # or vLLM aborted it.
                    if o.finish_reason == "length":
                        self._send(h, h.reply.end(FINISH_LENGTH))
                    else:
                        self._fail(h, f"vLLM ended the request ({o.finish_reason})")
                    break
        except asyncio.CancelledError:
            pass  # cancel() or close(): both already settled the request
        except Exception as e:
            msg = f"{type(e).__name__}: {e}"
            if llm.errored:
                self._error = f"the vLLM engine failed: {msg}"
            self._fail(h, self._error or msg)
        finally:
            self._open.discard(h)
            # Ends the request in vLLM if it is still running there (a stop string, a cancel).
            with contextlib.suppress(BaseException):
                await outputs.aclose()

    def _send(self, h: _Stream, d: Delta | None) -> None:
        if d is None or h.cancelled or h.finished:
            return
        if d.finish_reason:
            h.finished = True
        h.sink(d)

    def _fail(self, h: _Stream, message: str) -> None:
        if not h.finished:
            h.finished = True
            self._open.discard(h)
            if not h.cancelled:
                h.sink(Delta("", error=message, prompt_tokens=len(h.prompt), completion_tokens=len(h.reply.out)))
