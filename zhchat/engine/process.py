"""The generation Engine in a child process, for servers.

A Serve replica's event loop runs Python for every delta it streams. In the engine's own
process that Python holds the GIL that the engine thread needs between its torch calls:
under 16 streams a decode step took 17 ms of wall time for 11 ms of its own CPU
(bench/serve.py). vLLM runs its engine core in a process of its own for the same reason.

EngineProcess has the Engine's request side (zhchat.engine.base.EngineClient: prompts are
built here with the same tokenizer and DialogueFormat); the model runs in a child started
with `python -m zhchat.engine.process` over a socket pair: requests and cancellations go
one way, each engine step's deltas come back as one message. The child exits when the
socket closes (its parent died), and a child that dies fails every open request, which the
replica's health check then reports.
"""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Callable

from ..checkpoints import local_checkpoint
from ..dialogue import DialogueFormat
from .base import EngineClient
from .params import SamplingParams
from .types import Delta, EngineError, PromptTooLong


@dataclass(eq=False)
class _Handle:
    id: int
    sink: Callable[[Delta], None]
    done: bool = False


class EngineProcess(EngineClient):
    def __init__(self, path: str, max_batch_size: int = 16, threads: int = 1, start_timeout_s: float = 300):
        from ..tokenizer import load_tokenizer

        local = local_checkpoint(path)
        mine, theirs = socket.socketpair()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "zhchat.engine.process", str(theirs.fileno()), local, str(max_batch_size),
             str(threads)], pass_fds=[theirs.fileno()], env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        theirs.close()
        self._conn = Connection(mine.detach())
        if not self._conn.poll(start_timeout_s):
            self._proc.kill()
            raise EngineError(f"the engine process did not start within {start_timeout_s}s")
        kind, info = self._conn.recv()
        if kind != "ready":
            raise EngineError(f"the engine process failed to load {path}: {info}")
        self.context_length, self.vocab_size = info["context_length"], info["vocab_size"]
        self.device, self.max_batch_size = info["device"], max_batch_size
        self.tokenizer = load_tokenizer(local)
        self.fmt = DialogueFormat(self.tokenizer, self.context_length)
        self.error: str | None = None
        self._send_lock = threading.Lock()
        self._open: dict[int, _Handle] = {}
        self._ids = itertools.count()
        self._stats: dict = {}
        self._stats_ready = threading.Condition()
        self._stats_seq = 0  # stats answers received
        self._reader = threading.Thread(target=self._read, name="zhchat-engine-reader", daemon=True)
        self._reader.start()

    # -- EngineClient --------------------------------------------------------------------------
    def submit(self, prompt: list[int], params: SamplingParams, sink: Callable[[Delta], None]) -> _Handle:
        if len(prompt) + 1 > self.context_length:
            raise PromptTooLong(f"the prompt is {len(prompt)} tokens; the context is {self.context_length}")
        if self.error:
            raise EngineError(self.error)
        self.check_logit_bias(params)
        h = _Handle(next(self._ids), sink)
        self._open[h.id] = h
        self._send(("submit", h.id, list(prompt), params))
        return h

    def cancel(self, req: _Handle) -> None:
        if not req.done and self._open.pop(req.id, None) is not None:
            self._send(("cancel", req.id))

    @property
    def pid(self) -> int:
        return self._proc.pid

    def info(self) -> dict:
        return {"engine": "zhchat", "context_length": self.context_length, "vocab_size": self.vocab_size,
                "device": self.device, "max_batch_size": self.max_batch_size, "error": self.error,
                "stats": self.stats, "engine_pid": self.pid}

    @property
    def stats(self) -> dict:
        """The child engine's counters (a round trip; the last known ones if it is gone)."""
        try:
            return self._round_trip(5)
        except EngineError:
            return dict(self._stats)

    def _round_trip(self, timeout_s: float) -> dict:
        """Fresh counters from the child, or EngineError. The child answers between two
        engine steps, ahead of every queued request: a busy engine answers within a step."""
        with self._stats_ready:
            seen = self._stats_seq
            self._send(("stats",))
            if not self._stats_ready.wait_for(lambda: self._stats_seq > seen or self.error, timeout=timeout_s):
                raise EngineError(f"the engine process did not answer within {timeout_s:.0f}s")
            if self.error:
                raise EngineError(self.error)
            return dict(self._stats)

    def check_alive(self, timeout_s: float = 10.0) -> None:
        """The child is running and its loop answers (between steps, not after the queue)."""
        if self.error or self._proc.poll() is not None:
            raise EngineError(self.error or f"the engine process exited (code {self._proc.poll()})")
        self._round_trip(timeout_s)

    def close(self) -> None:
        try:
            self._send(("close",))
        except EngineError:
            pass
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
        self._conn.close()

    # -- plumbing --------------------------------------------------------------------------------
    def _send(self, msg: tuple) -> None:
        try:
            with self._send_lock:
                self._conn.send(msg)
        except (OSError, ValueError) as e:
            raise EngineError(self.error or f"the engine process is gone: {e}") from None

    def _read(self) -> None:
        reason = ""
        try:
            while True:
                msg = self._conn.recv()
                if msg[0] == "deltas":
                    for rid, d in msg[1]:
                        last = bool(d.finish_reason or d.error)
                        h = self._open.pop(rid, None) if last else self._open.get(rid)
                        if h is not None:
                            h.done = last
                            h.sink(d)
                elif msg[0] == "stats":
                    with self._stats_ready:
                        self._stats = msg[1]
                        self._stats_seq += 1
                        self._stats_ready.notify_all()
        except (EOFError, OSError):
            pass
        except Exception as e:  # noqa: BLE001 - a broken message must fail requests, not hang them
            reason = f": {type(e).__name__}: {e}"
        try:
            code = self._proc.wait(timeout=1)
        except subprocess.TimeoutExpired:
            code = None
        self.error = (f"the engine process exited (code {code})" if code is not None else "the engine process is gone") + reason
        for h in list(self._open.values()):
            h.done = True
            h.sink(Delta("", error=self.error))
        self._open.clear()
        with self._stats_ready:
            self._stats_ready.notify_all()


def _child(fd: int, path: str, max_batch_size: int, threads: int) -> None:
    """The child: one Engine whose loop runs in this main thread and reads the parent's
    commands itself between steps; each step's deltas go back as one message."""
    import torch

    from .local import Engine

    conn = Connection(fd)
    torch.set_num_threads(threads)
    try:
        engine = Engine.from_pretrained(path, max_batch_size=max_batch_size)
    except Exception as e:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    step: list[tuple[int, Delta]] = []
    requests: dict = {}

    def after_step() -> None:
        nonlocal step
        if step:
            items, step = step, []
            conn.send(("deltas", items))

    def sink_for(rid: int) -> Callable[[Delta], None]:
        def sink(d: Delta) -> None:
            step.append((rid, d))
            if d.finish_reason or d.error:
                requests.pop(rid, None)
        return sink

    def inbox(block: bool) -> None:
        """Every command waiting on the socket (blocking for the first one if asked).
        EOFError (the parent is gone) ends the loop, and with it this process."""
        while conn.poll(None if block else 0):
            block = False
            msg = conn.recv()
            if msg[0] == "submit":
                _, rid, prompt, params = msg
                try:
                    requests[rid] = engine.submit(prompt, params, sink_for(rid))
                except Exception as e:  # noqa: BLE001 - the request fails, not the process
                    conn.send(("deltas", [(rid, Delta("", error=f"{type(e).__name__}: {e}"))]))
            elif msg[0] == "cancel":
                req = requests.pop(msg[1], None)
                if req is not None:
                    engine.cancel(req)
            elif msg[0] == "stats":
                conn.send(("stats", dict(engine.stats)))
            elif msg[0] == "close":
                engine.close()
                return

    engine.after_step = after_step
    conn.send(("ready", {"context_length": engine.context_length, "vocab_size": engine.vocab_size,
                         "device": str(engine.device)}))
    try:
        engine.run(inbox)
    except (EOFError, OSError):  # the parent is gone
        pass


if __name__ == "__main__":
    _child(int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
