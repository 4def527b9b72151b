"""Checkpoints: Hugging Face model + tokenizer, plus the state needed to resume exactly.

A checkpoint folder loads with plain transformers (`AutoModelForCausalLM.from_pretrained`,
`AutoTokenizer.from_pretrained`); `trainer_state.pt` adds optimizer, scheduler, step,
data position and RNG states. Folders are written to a local temp dir and handed to
`ray.train.report`, which uploads them and only then registers them, so a crash mid-write
never leaves a checkpoint that Ray (or resume) would use.

Run folder layout and the `latest.json` pointers are described in zhchat/checkpoints.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import time

import numpy as np
import torch

from zhchat.checkpoints import POINTER, is_checkpoint, read_pointer, resolve_checkpoint  # noqa: F401 (re-export)
from zhchat.dialogue import END
from zhchat.storage import read_text, write_text

STATE_FILE = "trainer_state.pt"
INFO_FILE = "zhchat.json"


def checkpoint_dir_name(step: int) -> str:
    """Zero-padded so that sorting names sorts by step."""
    return f"checkpoint_step{step:07d}"


def rng_states() -> dict:
    """The host RNGs. No CUDA state: the loop reseeds the device generator before every
    step (loop.seed_step), and a saved state for every visible GPU would fail to restore on
    a worker that sees fewer GPUs after a resize."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_states(states: dict) -> None:
    """Restore rng_states(); a "cuda" entry of older checkpoints is ignored (see above)."""
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])


def save_checkpoint(path: str, model, tokenizer, trainer_state: dict, state: dict, info: dict) -> None:
    """Write one checkpoint folder (rank 0; the model is replicated under DDP)."""
    os.makedirs(path, exist_ok=True)
    # Replies end at <|end|>; plain `model.generate` then stops where zhchat's engine does.
    end_id = tokenizer.convert_tokens_to_ids(END)
    gen = model.generation_config
    gen.eos_token_id = [end_id, tokenizer.eos_token_id] if end_id is not None else tokenizer.eos_token_id
    gen.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    gen.bos_token_id = tokenizer.eos_token_id
    model.config.use_cache = True  # for inference; training turns it off again
    model.save_pretrained(path)
    model.config.use_cache = False
    tokenizer.save_pretrained(path)
    # trainer_state: optimizer, scheduler and (fp16) GradScaler state dicts (step.TrainStep).
    torch.save({**state, **trainer_state, "rng": rng_states()}, os.path.join(path, STATE_FILE))
    with open(os.path.join(path, INFO_FILE), "w", encoding="utf-8") as f:
        json.dump({**info, "step": state["step"], "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S")}, f,
                  ensure_ascii=False, indent=1, default=str)


# -- failures (what the next attempt and the driver's error message see) ----------------------

FAILURES_DIR = "failures"
REPEAT_LIMIT = 3  # attempts failing at the same step before the run gives up on it


def record_failure(run_dir: str, attempt: int, rank: int, step: int, cause: str) -> None:
    """One file per failing worker and attempt (cloud storage has no append)."""
    from zhchat.storage import join

    record = {"attempt": attempt, "rank": rank, "step": step, "cause": cause[:2000], "time": time.time()}
    try:
        write_text(join(run_dir, FAILURES_DIR, f"{attempt}-{rank}.json"), json.dumps(record, ensure_ascii=False))
    except Exception:  # noqa: BLE001 - never hide the real failure behind a failed write
        pass


def failure_records(run_dir: str) -> list[dict]:
    """Recorded failures of a run, oldest first."""
    from zhchat.storage import join, list_files

    records = []
    for path in list_files(join(run_dir, FAILURES_DIR)):
        text = read_text(path)
        if text:
            with contextlib.suppress(ValueError):
                records.append(json.loads(text))
    return sorted(records, key=lambda r: r.get("time", 0))


def repeated_failure(records: list[dict], after_step: int, limit: int = REPEAT_LIMIT) -> int | None:
    """A step past `after_step` (where this attempt resumes) at which `limit` different
    attempts failed: retrying it again would fail again (a bad batch, a bug, OOM)."""
    attempts: dict[int, set] = {}
    for r in records:
        if r["step"] > after_step:
            attempts.setdefault(r["step"], set()).add(r["attempt"])
    stuck = [s for s, a in attempts.items() if len(a) >= limit]
    return min(stuck) if stuck else None


def load_state(path: str) -> dict:
    """trainer_state.pt of a checkpoint folder (optimizer/scheduler state dicts, step, epoch, rng)."""
    file = os.path.join(path, STATE_FILE)
    if not os.path.exists(file):
        raise FileNotFoundError(f"{path} has no {STATE_FILE}: it is a model checkpoint, not a resumable one")
    # weights_only=False: the state holds Python RNG tuples and numpy arrays (our own files).
    return torch.load(file, map_location="cpu", weights_only=False)


# -- run folders (driver side) ---------------------------------------------------------------


def run_name(train_cfg, data_dir: str) -> str:
    """The given name, else '<preset or model>-<data folder>-<hash of what defines the run>'.

    max_steps is left out of the hash so that raising it continues the same run.
    """
    if train_cfg.name:
        return train_cfg.name
    base = re.sub(r"[^A-Za-z0-9_.-]+", "-", os.path.basename(train_cfg.init_from.rstrip("/"))) if train_cfg.init_from else train_cfg.preset
    key = train_cfg.model_dump(mode="json", exclude={"name", "out", "max_steps", "num_workers", "min_workers",
                                                      "cpus_per_worker", "torch_threads", "max_failures",
                                                      "log_every", "checkpoint_every", "keep_last"})
    key["data"] = os.path.abspath(data_dir) if "://" not in data_dir else data_dir
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:6]
    data_name = re.sub(r"[^A-Za-z0-9_.-]+", "-", os.path.basename(data_dir.rstrip("/")) or "data")
    return f"{base}-{data_name}-{digest}"


def finished_step(run_dir: str) -> int | None:
    """The step a finished run ended at (from its latest.json), or None if not finished."""
    pointer = read_pointer(run_dir)
    if pointer and pointer.get("status") == "finished":
        return int(pointer.get("step", 0))
    return None


def write_pointers(out_dir: str, name: str, run_pointer: dict) -> None:
    """OUT/NAME/latest.json (the run) and OUT/latest.json (which run finished last)."""
    from zhchat.storage import join

    write_text(join(out_dir, name, POINTER), json.dumps(run_pointer, ensure_ascii=False, indent=1, default=str))
    write_text(join(out_dir, POINTER),
               json.dumps({"run": name, "best_checkpoint_path": run_pointer.get("best_checkpoint_path")},
                          ensure_ascii=False, indent=1))
