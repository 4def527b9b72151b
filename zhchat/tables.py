"""Schemas of the tables stages hand to each other, and small helpers around them.

The dialogue table (written by ingest and crawl, read by preprocess) has one row per
dialogue: `id` (stable content hash), `source` (file or URL it came from), `turns`
(utterances, speakers alternating, the last one the reply), `system` (a system prompt,
"" when none). The quarantine table keeps every record that could not be used, with why.
"""

from __future__ import annotations

import hashlib
import json
from typing import Sequence

import pyarrow as pa

DIALOGUE_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("source", pa.string()),
    ("turns", pa.list_(pa.string())),
    ("system", pa.string()),
])

QUARANTINE_SCHEMA = pa.schema([
    ("file", pa.string()),
    ("line", pa.int64()),
    ("reason", pa.string()),
    ("record", pa.string()),  # the raw record, cut to 2,000 characters
])


# Why preprocess removed a dialogue: the `reason` of OUT/removed/ (pipelines/preprocess.py's
# REMOVED_SCHEMA: id, source, turns, system, reason, detail), with what `detail` holds.
REMOVED_REASONS = {
    "empty_after_cleaning": "removed/cleaning: the rules that fired (rule_hits JSON)",
    "too_few_turns": "removed/cleaning: the rules that fired (rule_hits JSON)",
    "sensitive_word": "removed/cleaning: the word of clean.sensitive.words found",
    "ads": "removed/cleaning: what was found (a contact handle, an ad word, a link with a sales cue, a repeat)",
    "not_chinese": "removed/cleaning: the share of Chinese words",
    "repeated_turns": "removed/cleaning: how many turns repeat an earlier one",
    "length_ratio": "removed/cleaning: the lengths of the turn before the reply and the reply",
    "generic_reply": "removed/cleaning: the reply",
    "duplicate": "removed/duplicates: the id of the copy kept",
    "near_duplicate": "removed/near_duplicates: the id of the dialogue it near-duplicates",
    "generic_reply_cross_context": "removed/near_duplicates: the id of a dialogue with the same reply",
}


def dialogue_id(turns: Sequence[str], system: str = "") -> str:
    """A stable id from the content, so the split by id hash is the same on every run."""
    h = hashlib.blake2b(json.dumps([system, list(turns)], ensure_ascii=False).encode("utf-8"), digest_size=10)
    return h.hexdigest()


def dialogue_row(turns: Sequence[str], source: str, system: str = "") -> dict:
    return {"id": dialogue_id(turns, system), "source": source, "turns": list(turns), "system": system or ""}


def quarantine_row(file: str, line: int, reason: str, record: str | bytes) -> dict:
    if isinstance(record, bytes):
        record = record.decode("utf-8", errors="backslashreplace")
    return {"file": file, "line": int(line), "reason": reason, "record": record[:2000]}
