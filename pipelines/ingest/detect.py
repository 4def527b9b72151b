"""Which format a file is in, from its name and its first bytes, and why we think so.

`detect(name, head)` looks at the (decompressed) first 64 KB: JSON documents and JSON lines
are told apart by whether the first line is a complete JSON value, and by the shape of the
first record; text by tabs, Douban's 0/1 labels, and blank-line-separated short lines
(GPT2-chitchat). The file name only breaks ties that content cannot (STC vs LCCC).
"""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import dataclass

import ijson

from .readers import LAYOUTS

SPLIT_KEYS = {"train", "valid", "validation", "dev", "test"}


@dataclass(frozen=True)
class Detection:
    format: str | None   # None: could not tell
    layout: str
    why: str


def _hint(name: str, word: str) -> bool:
    return re.search(rf"(^|[^a-z]){word}([^a-z]|$)", name) is not None


def _stem(name: str) -> str:
    base = name.replace("\\", "/").rsplit("/", 1)[-1].lower()
    return base[:-3] if base.endswith(".gz") else base


def _lines(text: str, complete: bool) -> list[str]:
    lines = text.splitlines()
    if not complete and lines and not text.endswith(("\n", "\r")):
        lines.pop()  # cut off by the 64 KB head
    return lines


def _json_events(head: bytes, n: int = 64) -> list[tuple[str, object]]:
    """The first JSON parse events of a head that may be cut anywhere."""
    out: list[tuple[str, object]] = []
    try:
        for ev in ijson.parse(head, use_float=True):
            out.append(ev)
            if len(out) >= n:
                break
    except ijson.JSONError:
        pass
    return out


def _is_str_list(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _from_first_line(value, name: str) -> Detection | None:
    """A complete JSON value on the first line: JSON lines, or a one-line document."""
    stc = _hint(name, "stc")
    if isinstance(value, dict):
        if "messages" in value:
            return Detection("openai", "jsonl", "JSON lines of objects with 'messages'")
        if "conversations" in value:
            return Detection("sharegpt", "jsonl", "JSON lines of objects with 'conversations'")
        if value and set(value) <= SPLIT_KEYS:
            return Detection("stc" if stc else "lccc", "json",
                             "a one-line JSON object of train/valid/test lists" + (" (name says STC)" if stc else ""))
        return None
    if isinstance(value, list):
        if _is_str_list(value):
            if stc:
                return Detection("stc", "jsonl", "JSON lines of string arrays (name says STC)")
            return Detection("lccc_jsonl", "jsonl", "JSON lines of string arrays")
        if value and all(isinstance(x, list) for x in value):
            return Detection("stc" if stc else "lccc", "json", "a one-line JSON array of utterance arrays")
        if value and isinstance(value[0], dict) and "conversations" in value[0]:
            return Detection("sharegpt", "json", "a one-line JSON array of objects with 'conversations'")
    return None


def _from_events(head: bytes, name: str) -> Detection | None:
    """A JSON document spread over lines: look at its first keys and nesting."""
    events = _json_events(head)
    stc = _hint(name, "stc")
    if len(events) < 2:
        return None
    (_, top, _), (prefix, ev, val) = events[0], events[1]
    if top == "start_map" and ev == "map_key" and val in SPLIT_KEYS:
        return Detection("stc" if stc else "lccc", "json",
                         f"a JSON object with a {val!r} list" + (" (name says STC)" if stc else ""))
    if top == "start_array" and ev == "start_array":
        return Detection("stc" if stc else "lccc", "json", "a JSON array of utterance arrays")
    if top == "start_array" and ev == "start_map":
        keys = {v for p, e, v in events if p == "item" and e == "map_key"}
        if "conversations" in keys:
            return Detection("sharegpt", "json", "a JSON array of objects with 'conversations'")
    return None


def _from_text(lines: list[str], name: str) -> Detection:
    nonblank = [ln for ln in lines if ln.strip()][:200]
    if not nonblank:
        return Detection("text_lines", "lines", "blank text")
    labelled = sum(bool(re.match(r"[01]\t", ln)) for ln in nonblank) / len(nonblank)
    if labelled >= 0.9 or (labelled >= 0.5 and _hint(name, "douban")):
        return Detection("douban", "tsv", "tab-separated lines starting with a 0/1 label")
    tabbed = sum("\t" in ln for ln in nonblank) / len(nonblank)
    if tabbed >= 0.5:
        if _hint(name, "stc"):
            return Detection("stc", "tsv", "tab-separated lines (name says STC)")
        return Detection("lccc_tsv", "tsv", "tab-separated utterances, one dialogue per line")
    # Runs of non-blank lines; more than one means blank lines separate groups.
    groups = sum(1 for i, ln in enumerate(lines) if ln.strip() and (i == 0 or not lines[i - 1].strip()))
    median = statistics.median(len(ln.strip()) for ln in nonblank)
    if _hint(name, "chitchat") or (groups > 1 and len(nonblank) / groups >= 2 and median <= 100):
        return Detection("chitchat", "blocks", "short lines in blank-line-separated groups")
    if groups > 1 and median > 100:
        return Detection("text_file", "whole", "paragraphs separated by blank lines: one document per file")
    return Detection("text_lines", "lines", "plain text lines: one document per line")


def detect(name: str, head: bytes, complete: bool = False) -> Detection:
    """Guess a file's format from its name and first (decompressed) bytes."""
    stem = _stem(name)
    if not head.strip():
        return Detection("text_lines", "lines", "empty file")
    if b"\x00" in head[:8192]:
        return Detection(None, "", "binary data (NUL bytes), not a text format")
    text = head.removeprefix(b"\xef\xbb\xbf").decode("utf-8", errors="replace")
    stripped = text.lstrip()
    if stripped[0] in "[{":
        # The first line alone is a JSON value: JSON lines (or a one-line document). Else a
        # document spread over lines, or JSON lines whose first line is broken: then the
        # next line holding a whole array or object tells.
        lines = [ln for ln in _lines(stripped, complete) if ln.strip()][:20]
        found = None
        try:
            found = _from_first_line(json.loads(lines[0] if lines else stripped), stem)
        except json.JSONDecodeError:
            found = _from_events(head.removeprefix(b"\xef\xbb\xbf"), stem)
            for line in lines[1:] if found is None else []:
                try:
                    value = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(value, (dict, list)) and value:
                    found = _from_first_line(value, stem)
                    break
        if found:
            return found
        return Detection(None, "", "JSON that is none of LCCC, STC, ShareGPT or OpenAI messages")
    return _from_text(_lines(text, complete), stem)


def layout_for(fmt: str, head: bytes) -> tuple[str, str]:
    """The layout of a file whose format was given: sniffed where a format has several."""
    layouts = LAYOUTS[fmt]
    if len(layouts) == 1:
        return layouts[0], "given"
    s = head.removeprefix(b"\xef\xbb\xbf").lstrip()
    if s[:1] in (b"[", b"{"):
        first = s.splitlines()[0] if s else b""
        try:
            value = json.loads(first)
            one_line_doc = isinstance(value, dict) and set(value) <= SPLIT_KEYS or (
                isinstance(value, list) and value and not _is_str_list(value))
            layout = "json" if one_line_doc else "jsonl"
        except json.JSONDecodeError:
            layout = "json"
        if layout in layouts:
            return layout, f"given; {layout} layout from the first bytes"
    if "tsv" in layouts:
        return "tsv", "given; tsv layout from the first bytes"
    return layouts[0], "given"
