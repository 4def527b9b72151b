"""OUT/manifest.json: what preprocess read, with which config, and what it produced.

The manifest is written last, so its presence means the outputs are complete. A rerun with
the same input files (by sha256) and the same config finds it and skips the work. This
module owns reading it: training and evaluation ask it for the data folder's format
(`load_manifest`, `data_format`, `context_length`) instead of reading the JSON themselves.
Files go through zhchat.storage (pyarrow's filesystems, as Ray Data and Ray Train use).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from typing import Any, Sequence

from zhchat.config import PreprocessConfig
from zhchat.storage import exists, filesystem, join, list_files, read_text, size, write_text

MANIFEST = "manifest.json"
VERSION = 1
# Paths say where things are, not what they are: moving the input folder or choosing another
# output folder does not change the work. `force` only asks to redo it.
_NOT_FINGERPRINTED = {"input", "out", "force"}


def list_parquet(path: str) -> list[str]:
    """Sorted *.parquet files directly under a local folder or cloud URI ([] if none)."""
    return [f for f in list_files(path) if f.endswith(".parquet")]


def input_files(input_dir: str) -> list[str]:
    """The dialogue tables written by ingest or crawl: INPUT/dialogues/*.parquet."""
    files = list_parquet(join(input_dir, "dialogues"))
    if not files:
        raise FileNotFoundError(f"no dialogue tables in {join(input_dir, 'dialogues')}/*.parquet "
                                "(run `zhchat ingest` or `zhchat crawl` first, or pass --in)")
    return files


def file_sha256(path: str) -> str:
    fs, p = filesystem(path)
    h = hashlib.sha256()
    with fs.open_input_stream(p) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def hash_inputs(files: Sequence[str]) -> list[dict[str, Any]]:
    out = []
    for f in files:
        out.append({"path": f, "sha256": file_sha256(f), "bytes": size(f)})
    return out


def config_fingerprint(cfg: PreprocessConfig) -> dict[str, Any]:
    return cfg.model_dump(mode="json", exclude=_NOT_FINGERPRINTED)


def build_manifest(inputs: list[dict[str, Any]], cfg: PreprocessConfig, counts: dict[str, Any],
                   tokenizer: dict[str, Any]) -> dict[str, Any]:
    return {
        "version": VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "inputs": inputs,
        "config": cfg.model_dump(mode="json", by_alias=True),
        "fingerprint": config_fingerprint(cfg),
        "counts": counts,
        "tokenizer": tokenizer,
    }


def write_manifest(out_dir: str, manifest: dict[str, Any]) -> str:
    path = join(out_dir, MANIFEST)
    # Through a temporary name: a crash never leaves a half-written manifest.
    write_text(path, json.dumps(manifest, ensure_ascii=False, indent=2))
    return path


def read_manifest(out_dir: str) -> dict[str, Any] | None:
    """The manifest, or None when absent or unreadable (preprocess then redoes the work)."""
    try:
        text = read_text(join(out_dir, MANIFEST))
        return json.loads(text) if text is not None else None
    except (OSError, ValueError):
        return None


def load_manifest(data_dir: str) -> dict:
    """DATA/manifest.json for a stage that reads the data, with clear errors when the folder
    is not a complete preprocess output."""
    text = read_text(join(data_dir, MANIFEST))
    if text is None:
        raise FileNotFoundError(
            f"{data_dir} has no {MANIFEST}: it is not a folder written by `zhchat preprocess` "
            "(run preprocess first, or point --data at its --out folder)")
    manifest = json.loads(text)
    for what in ("tokenizer/tokenizer.json", "tokens/train"):
        if not exists(join(data_dir, *what.split("/"))):
            raise FileNotFoundError(f"{data_dir} is missing {what}; re-run `zhchat preprocess`")
    return manifest


def data_format(manifest: dict) -> dict:
    """The dialogue-format section (FormatConfig) the data was encoded with."""
    fmt = (manifest.get("config") or {}).get("format")
    if not isinstance(fmt, dict):
        raise ValueError(f"{MANIFEST} has no config.format section; re-run `zhchat preprocess`")
    return fmt


def context_length(manifest: dict) -> int:
    value = data_format(manifest).get("context_length")
    if not value:
        raise ValueError(f"{MANIFEST} has no config.format.context_length; re-run `zhchat preprocess`")
    return int(value)


def is_complete(out_dir: str, inputs: Sequence[str] | Sequence[dict], cfg: PreprocessConfig) -> bool:
    """True when OUT holds finished outputs of these input files (by content) and this config.

    `inputs` are file paths, or the entries of hash_inputs() to avoid hashing twice.
    """
    m = read_manifest(out_dir)
    if not m or m.get("version") != VERSION:
        return False
    hashed = [x if isinstance(x, dict) else {"sha256": file_sha256(x)} for x in inputs]
    if sorted(x["sha256"] for x in hashed) != sorted(x["sha256"] for x in m.get("inputs", [])):
        return False
    if m.get("fingerprint") != config_fingerprint(cfg):
        return False
    tok_json = join(out_dir, "tokenizer", "tokenizer.json")
    try:
        if file_sha256(tok_json) != m.get("tokenizer", {}).get("sha256"):
            return False
    except (FileNotFoundError, OSError):
        return False
    # Shards may be legitimately empty for small validation/test splits, but never for train.
    return bool(list_parquet(join(out_dir, "tokens", "train")))
