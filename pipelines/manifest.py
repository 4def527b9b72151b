"""OUT/manifest.json: what preprocess read, with which config, and what it produced.

The manifest is written last, so its presence means the outputs are complete. A rerun with
the same input files (by sha256) and the same config finds it and skips the work.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from typing import Any, Sequence

from zhchat.config import PreprocessConfig, is_uri

MANIFEST = "manifest.json"
VERSION = 1
# Paths say where things are, not what they are: moving the input folder or choosing another
# output folder does not change the work. `force` only asks to redo it.
_NOT_FINGERPRINTED = {"input", "out", "force"}


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def list_parquet(path: str) -> list[str]:
    """Sorted *.parquet files directly under a local folder or cloud URI ([] if none)."""
    if not is_uri(path):
        if not os.path.isdir(path):
            return []
        return sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".parquet"))
    import fsspec

    fs, root = fsspec.core.url_to_fs(path)
    if not fs.exists(root):
        return []
    proto = path.split("://", 1)[0]
    return sorted(f"{proto}://{p}" for p in fs.glob(f"{root.rstrip('/')}/*.parquet"))


def input_files(input_dir: str) -> list[str]:
    """The dialogue tables written by ingest or crawl: INPUT/dialogues/*.parquet."""
    files = list_parquet(join(input_dir, "dialogues"))
    if not files:
        raise FileNotFoundError(f"no dialogue tables in {join(input_dir, 'dialogues')}/*.parquet "
                                "(run `zhchat ingest` or `zhchat crawl` first, or pass --in)")
    return files


def file_sha256(path: str) -> str:
    import fsspec

    h = hashlib.sha256()
    with fsspec.open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def hash_inputs(files: Sequence[str]) -> list[dict[str, Any]]:
    out = []
    for f in files:
        import fsspec

        fs, p = fsspec.core.url_to_fs(f)
        out.append({"path": f, "sha256": file_sha256(f), "bytes": int(fs.size(p))})
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
    text = json.dumps(manifest, ensure_ascii=False, indent=2)
    if is_uri(out_dir):
        import fsspec

        with fsspec.open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path
    os.makedirs(out_dir, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written manifest
    return path


def read_manifest(out_dir: str) -> dict[str, Any] | None:
    import fsspec

    path = join(out_dir, MANIFEST)
    fs, p = fsspec.core.url_to_fs(path)
    if not fs.exists(p):
        return None
    try:
        with fsspec.open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None  # unreadable: treat as absent and redo the work


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
