"""Finding a model checkpoint from what a user types: a checkpoint, a run, or a runs folder.

Shared by evaluation and serving (which must not import training code). Layout written
by `zhchat train`:

    OUT/latest.json                      -> {"run": NAME, ...}      (the last run that finished)
    OUT/NAME/latest.json                 -> {"best_checkpoint": "checkpoint_step000600", ...}
    OUT/NAME/checkpoint_step000600/      config.json, model.safetensors, tokenizer.json, ...

A checkpoint folder is plain Hugging Face format: `AutoModelForCausalLM.from_pretrained`
and `AutoTokenizer.from_pretrained` load it without this project.
"""

from __future__ import annotations

import json
import os
import posixpath

from .config import is_uri
from .storage import exists, join, list_dirs, local_copy, read_text

POINTER = "latest.json"


def is_checkpoint(path: str) -> bool:
    return exists(join(path, "config.json"))


def read_pointer(folder: str) -> dict | None:
    """The latest.json of a run (or runs) folder, or None."""
    text = read_text(join(folder, POINTER))
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{join(folder, POINTER)} is not valid JSON: {e}") from e


def resolve_checkpoint(path: str) -> str:
    """A checkpoint folder for `path`: itself if it is one, else the best checkpoint of the run.

    Raises FileNotFoundError naming what was looked for.
    """
    if not is_uri(path):
        path = os.path.abspath(os.path.expanduser(path))
    if is_checkpoint(path):
        return path
    pointer = read_pointer(path)
    if pointer is not None:
        if "run" in pointer and "best_checkpoint" not in pointer:  # a runs folder: follow to the run
            return resolve_checkpoint(join(path, pointer["run"]))
        rel = pointer.get("best_checkpoint") or pointer.get("latest_checkpoint")
        if rel:
            ckpt = rel if (is_uri(rel) or posixpath.isabs(rel)) else join(path, rel)
            if is_checkpoint(ckpt):
                return ckpt
            raise FileNotFoundError(f"{join(path, POINTER)} points to {ckpt}, which is not a checkpoint (no config.json)")
    if not exists(path):
        raise FileNotFoundError(f"model path does not exist: {path}")
    # A run that stopped before finishing has no pointer yet: take its best registered
    # checkpoint (Ray lists a checkpoint only after it is fully uploaded).
    found = _registered_checkpoint(path) or _newest_checkpoint_dir(path)
    if found:
        return found
    raise FileNotFoundError(
        f"{path} is neither a checkpoint (no config.json) nor a training run (no {POINTER} and no "
        "checkpoint_* folders); pass a checkpoint folder or the run folder written by `zhchat train`"
    )


RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"


def _registered_checkpoint(run_dir: str) -> str | None:
    """Best (lowest val_loss, else latest) checkpoint in Ray Train's snapshot of the run."""
    text = read_text(join(run_dir, RAY_SNAPSHOT))
    if not text:
        return None
    try:
        snap = json.loads(text)
    except json.JSONDecodeError:
        return None
    results = [r for r in snap.get("checkpoint_results", []) if r.get("checkpoint_dir_name")]
    scored = [r for r in results if isinstance(r.get("metrics", {}).get("val_loss"), (int, float))]
    pick = min(scored, key=lambda r: r["metrics"]["val_loss"]) if scored else snap.get("latest_checkpoint_result")
    if not pick or not pick.get("checkpoint_dir_name"):
        return None
    ckpt = join(run_dir, pick["checkpoint_dir_name"])
    return ckpt if is_checkpoint(ckpt) else None


def _newest_checkpoint_dir(run_dir: str) -> str | None:
    names = [n for n in list_dirs(run_dir) if n.startswith("checkpoint_")]
    for name in reversed(names):  # names carry the zero-padded step, so sorting is by step
        if is_checkpoint(join(run_dir, name)):
            return join(run_dir, name)
    return None


def local_checkpoint(path: str, cache_dir: str | None = None) -> str:
    """resolve_checkpoint, then download a cloud checkpoint to a local folder (transformers
    loads only local folders or hub ids), cached by its URI. Local paths are returned as they are."""
    ckpt = resolve_checkpoint(path)
    if not is_uri(ckpt):
        return ckpt
    import hashlib

    cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "zhchat", "checkpoints")
    return local_copy(ckpt, os.path.join(cache_dir, hashlib.sha1(ckpt.encode()).hexdigest()[:16]))
