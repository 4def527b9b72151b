"""One plain parser per input format: a record in, a dialogue (or why not) out.

Every parser returns a `Parsed` tuple:
    ("ok", (turns, system))   a dialogue: turns alternate speakers, the last one is the reply
    ("skip", reason)          a valid record that is not a dialogue (Douban label 0, blank line)
    ("bad", reason)           a malformed record, to be quarantined with this reason

Text is not cleaned here (preprocess does that): utterances are only stripped of surrounding
whitespace, and empty ones dropped. No Ray, no files: tests call these directly.
"""

from __future__ import annotations

import json
import re
from typing import Any, Sequence

Parsed = tuple[str, Any]

# Stands in for bytes that are not UTF-8 inside a JSON document (see chunks.Utf8Marked):
# a noncharacter that never occurs in real text, so a record holding it is quarantined.
INVALID_UTF8_MARK = "\U0010fffe"
_SURROGATE = re.compile("[\ud800-\udfff]")
_UNUSABLE = re.compile("[\ud800-\udfff\U0010fffe]")

SHAREGPT_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bard": "assistant",
    "bing": "assistant", "model": "assistant",
    "system": "system",
}
OPENAI_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}


def ok(turns: list[str], system: str = "") -> Parsed:
    return ("ok", (turns, system))


def bad(reason: str) -> Parsed:
    return ("bad", reason)


def skip(reason: str) -> Parsed:
    return ("skip", reason)


def _type(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _unusable_text(s: str) -> str | None:
    """Why a decoded string cannot be stored as UTF-8 (None when it can)."""
    if INVALID_UTF8_MARK in s:
        return "invalid UTF-8 bytes"
    if _SURROGATE.search(s):
        return "an unpaired surrogate escape (\\ud800-\\udfff)"
    return None


def _checked(turns: list[str], system: str = "") -> Parsed:
    if not _UNUSABLE.search("".join(turns)) and not _UNUSABLE.search(system):  # the common case, in one scan
        return ok(turns, system)
    for i, t in enumerate([system, *turns]):
        why = _unusable_text(t)
        if why:
            where = "the system prompt" if i == 0 else f"utterance {i}"
            return bad(f"{where} holds {why}")
    return ok(turns, system)


def utterances(values: Sequence[Any], what: str = "utterance") -> Parsed:
    """A plain (speaker-less) dialogue: strip, drop empty utterances at either end.

    An empty utterance *inside* a dialogue is quarantined instead of dropped: dropping it
    would make the two speakers' turns run together and swap every role before it.
    """
    try:
        turns = [v.strip() for v in values]
    except (AttributeError, TypeError):
        turns = []
    if len(turns) != len(values) or not all(isinstance(v, str) for v in values):
        i, v = next((i, v) for i, v in enumerate(values, 1) if not isinstance(v, str))
        return bad(f"{what} {i} is {_type(v)}, expected a string")
    lo, hi = 0, len(turns)
    while lo < hi and not turns[lo]:
        lo += 1
    while hi > lo and not turns[hi - 1]:
        hi -= 1
    if lo == hi:
        return bad("no non-empty utterance")
    for i in range(lo, hi):
        if not turns[i]:
            return bad(f"{what} {i + 1} is empty inside the dialogue (dropping it would break speaker alternation)")
    return _checked(turns[lo:hi])


# ---- LCCC / STC -------------------------------------------------------------------------

def lccc_record(value: Any, pair: bool = False) -> Parsed:
    """One LCCC dialogue (a JSON array of utterances); STC when pair=True ([post, response])."""
    if not isinstance(value, list):
        return bad(f"expected a JSON array of utterances, got {_type(value)}")
    if pair:
        return stc_pair(value)
    return utterances(value)


def stc_pair(values: list[Any]) -> Parsed:
    if len(values) != 2:
        return bad(f"STC record must be a [post, response] pair, got {len(values)} utterances")
    for i, v in enumerate(values, 1):
        if not isinstance(v, str):
            return bad(f"utterance {i} is {_type(v)}, expected a string")
    post, response = values[0].strip(), values[1].strip()
    if not post or not response:
        return bad("STC pair has an empty " + ("post" if not post else "response"))
    return _checked([post, response])


def lccc_jsonl_line(text: str, pair: bool = False) -> Parsed:
    value, err = _loads(text)
    return bad(err) if err else lccc_record(value, pair)


def lccc_tsv_line(text: str, pair: bool = False) -> Parsed:
    fields = text.split("\t")
    return stc_pair(fields) if pair else utterances(fields)


# ---- Douban -----------------------------------------------------------------------------

def douban_line(text: str) -> Parsed:
    """`label \\t utt1 \\t ... \\t uttN \\t response`; label 0 marks a wrong reply: skipped."""
    fields = text.split("\t")
    label = fields[0].strip()
    if label == "0":
        return skip("label 0 (wrong reply)")
    if label != "1":
        return bad(f"Douban label must be 0 or 1, got {label[:20]!r}")
    if len(fields) < 3:
        return bad(f"Douban line needs a label, a context and a response; got {len(fields) - 1} utterance(s)")
    return utterances(fields[1:])


# ---- GPT2-chitchat ----------------------------------------------------------------------

def chitchat_block(lines: Sequence[str]) -> Parsed:
    """One dialogue: consecutive non-blank lines, one utterance each."""
    return utterances(list(lines))


# ---- role-tagged formats ----------------------------------------------------------------

def turns_from_messages(messages: Sequence[tuple[str, str]], system: str = "") -> Parsed:
    """(role, text) pairs -> alternating turns ending in a reply, plus the system prompt.

    Consecutive messages of one role are merged with "\\n"; empty messages are dropped; a
    trailing user message with no reply is dropped; leading system messages join `system`.
    """
    systems = [system.strip()] if system and system.strip() else []
    merged: list[tuple[str, list[str]]] = []
    for i, (role, text) in enumerate(messages, 1):
        text = text.strip()
        if role == "system":
            if merged:
                return bad(f"message {i} is a system message after the dialogue started")
            if text:
                systems.append(text)
            continue
        if not text:
            continue
        if merged and merged[-1][0] == role:
            merged[-1][1].append(text)
        else:
            merged.append((role, [text]))
    if merged and merged[-1][0] == "user":
        merged.pop()
    if not any(role == "assistant" for role, _ in merged):
        return bad("no assistant reply in the dialogue")
    return _checked(["\n".join(parts) for _, parts in merged], "\n".join(systems))


def sharegpt_record(obj: Any) -> Parsed:
    """`{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}], "system": ...}`."""
    if not isinstance(obj, dict):
        return bad(f"expected a JSON object with 'conversations', got {_type(obj)}")
    conv = obj.get("conversations")
    if not isinstance(conv, list):
        return bad("'conversations' is missing" if conv is None else f"'conversations' is {_type(conv)}, expected a list")
    system = obj.get("system") or ""
    if not isinstance(system, str):
        return bad(f"'system' is {_type(system)}, expected a string")
    messages = []
    for i, m in enumerate(conv, 1):
        if not isinstance(m, dict):
            return bad(f"message {i} is {_type(m)}, expected an object with 'from' and 'value'")
        who, value = m.get("from"), m.get("value")
        if not isinstance(who, str):
            return bad(f"message {i} has no 'from'" if who is None else f"message {i} 'from' is {_type(who)}")
        role = SHAREGPT_ROLES.get(who.strip().lower())
        if role is None:
            return bad(f"message {i} has unsupported role {who[:40]!r} (expected human, gpt or system)")
        if value is None:
            value = ""
        if not isinstance(value, str):
            return bad(f"message {i} 'value' is {_type(value)}, expected a string")
        messages.append((role, value))
    return turns_from_messages(messages, system)


def _openai_content(content: Any) -> str | None:
    """A message's text: a string, or the text parts of a content-part list."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                return None
            texts.append(part["text"])
        return "".join(texts)
    return None


def openai_record(obj: Any) -> Parsed:
    """`{"messages": [{"role": "user"|"assistant"|"system", "content": ...}]}`."""
    if not isinstance(obj, dict):
        return bad(f"expected a JSON object with 'messages', got {_type(obj)}")
    msgs = obj.get("messages")
    if not isinstance(msgs, list):
        return bad("'messages' is missing" if msgs is None else f"'messages' is {_type(msgs)}, expected a list")
    messages = []
    for i, m in enumerate(msgs, 1):
        if not isinstance(m, dict):
            return bad(f"message {i} is {_type(m)}, expected an object with 'role' and 'content'")
        who = m.get("role")
        if not isinstance(who, str):
            return bad(f"message {i} has no 'role'" if who is None else f"message {i} 'role' is {_type(who)}")
        role = OPENAI_ROLES.get(who)
        if role is None:
            return bad(f"message {i} has unsupported role {who[:40]!r} (expected user, assistant or system)")
        if m.get("tool_calls"):
            return bad(f"message {i} holds tool calls, which a chat dialogue cannot represent")
        text = _openai_content(m.get("content"))
        if text is None:
            return bad(f"message {i} 'content' is {_type(m.get('content'))} with non-text parts, expected text")
        messages.append((role, text))
    return turns_from_messages(messages)


def sharegpt_line(text: str) -> Parsed:
    value, err = _loads(text)
    return bad(err) if err else sharegpt_record(value)


def openai_line(text: str) -> Parsed:
    value, err = _loads(text)
    return bad(err) if err else openai_record(value)


# ---- plain text -------------------------------------------------------------------------

def text_document(text: str) -> Parsed:
    """A document becomes a single-turn row (text_lines: a line; text_file: a whole file)."""
    text = text.strip()
    if not text:
        return skip("empty document")
    return _checked([text])


# ---- helpers ----------------------------------------------------------------------------

def _loads(text: str) -> tuple[Any, str | None]:
    try:
        return json.loads(text), None
    except json.JSONDecodeError as e:
        return None, f"invalid JSON: {e.msg} at column {e.colno}"
    except RecursionError:
        return None, "invalid JSON: nested too deeply"


# (format, layout) -> parser of one decoded line. Layouts: jsonl (a JSON value per line),
# tsv/lines (a text line). Whole-JSON and block layouts are read in chunks.py.
LINE_PARSERS = {
    ("lccc_jsonl", "jsonl"): lccc_jsonl_line,
    ("lccc_tsv", "tsv"): lccc_tsv_line,
    ("stc", "jsonl"): lambda t: lccc_jsonl_line(t, pair=True),
    ("stc", "tsv"): lambda t: lccc_tsv_line(t, pair=True),
    ("douban", "tsv"): douban_line,
    ("sharegpt", "jsonl"): sharegpt_line,
    ("openai", "jsonl"): openai_line,
    ("text_lines", "lines"): text_document,
}

# (format, layout) -> parser of one record of a whole JSON document.
JSON_RECORD_PARSERS = {
    ("lccc", "json"): lccc_record,
    ("stc", "json"): lambda v: lccc_record(v, pair=True),
    ("sharegpt", "json"): sharegpt_record,
}

# Layouts each format can come in; the first is its usual one.
LAYOUTS: dict[str, tuple[str, ...]] = {
    "lccc": ("json",), "lccc_jsonl": ("jsonl",), "lccc_tsv": ("tsv",),
    "stc": ("json", "jsonl", "tsv"), "douban": ("tsv",), "chitchat": ("blocks",),
    "sharegpt": ("json", "jsonl"), "openai": ("jsonl",),
    "text_lines": ("lines",), "text_file": ("whole",),
}
