"""Cleaning dialogues: named text rules per turn, length limits per dialogue, dedup.

Rules run in this order on every turn (each counted under its name in `rule_hits`):

    nfkc        Unicode NFKC: full-width letters and digits become ASCII, so every later
                pattern sees one spelling (１３８ is 138, ＡＢＣ is ABC); the Chinese punctuation
                that input methods type (，。！？：；（）～…) is kept as it is
    invisible   zero-width and control characters
    whitespace  runs of any white space become one space; ends stripped
    repost      Weibo repost chains "//@某人:…" (to the end), "转发微博", "回复@某人:"
    url         links (http://, www., t.cn/…) and Weibo's "网页链接"
    mention     @mentions (an e-mail address is not a mention)
    topic       #话题#
    emoji       emoji, when clean.emoji is "remove"
    unspace     LCCC/Douban spacing: a space next to a CJK character goes when the other side is
                CJK, a digit or punctuation ("我 爱 你" -> "我爱你"); spaces between Latin words stay
    email, id_card, bank_card, phone, landline
                privacy placeholders <邮箱> <身份证> <银行卡> <电话>; before the regex rules and
                the repeat cut, which would otherwise break the digits they look for. ID cards
                must pass the GB 11643 check digit and bank cards the Luhn check, so order and
                tracking numbers stay as they are
    rule:<re>   the configured regex -> replacement pairs (clean.rules), in order
    repeat      runs of one non-digit character cut to max_repeat_chars (digits are numbers:
                1000000 stays)
    too_long    turns longer than max_turn_chars are cut
    too_short   turns shorter than min_turn_chars (after cleaning) are removed
    context_gap a removed turn in the middle would make the next speaker look like the previous
                one, so only the longest run of consecutive kept turns stays (ties: the later)
    max_turns   turns before the last max_turns

A dialogue left with no turns gets drop_reason "empty_after_cleaning", with fewer than
min_turns "too_few_turns"; clean_batch never drops rows itself (the caller writes them to
the removed table). The system prompt gets the text rules but no length limits, uncounted.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import unicodedata
from collections import Counter
from typing import Any, Callable, Iterable, Sequence

import regex  # \p{Extended_Pictographic} for emoji; the standard `re` has no Unicode properties

from zhchat.config import CleanConfig

# -- character classes ------------------------------------------------------------------------
# CJK ideographs (BMP + supplementary planes), kana, CJK punctuation, full-width forms.
# Hangul is left out on purpose: Korean separates words with spaces.
_CJK = (r"\u2e80-\u2fdf\u3000-\u303f\u3040-\u30ff\u3100-\u312f\u3190-\u31ff\u3400-\u4dbf"
        r"\u4e00-\u9fff\uf900-\ufaff\ufe30-\ufe4f\uff00-\uffef\U00020000-\U0003134f")
# Sentence punctuation only: "C# 和" or "A & 我" keep their space.
_ASCII_PUNCT = r"!\"'(),.:;<>?\[\]~"
_JOINABLE = _CJK + _ASCII_PUNCT + "0-9"

_INVISIBLE = re.compile(
    r"[\u0000-\u0008\u000b\u000c\u000e-\u001f\u007f-\u009f\u00ad\u061c\u180e\u200b\u200c\u200e\u200f"
    r"\u202a-\u202e\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb\U000e0000-\U000e007f]"
)
# A zero-width joiner only means something inside an emoji sequence.
_STRAY_ZWJ = regex.compile(r"(?<![\p{Extended_Pictographic}\ufe0f\U0001F3FB-\U0001F3FF])\u200d"
                           r"|\u200d(?!\p{Extended_Pictographic})")
_WHITESPACE = re.compile(r"\s+")
_SPACES = re.compile(r" {2,}")

# "转发微博" is Weibo's default repost text: removed only as a whole turn or before a chain.
_REPOST = re.compile(r"//\s*@[^\s:：/]{1,30}\s*[:：].*$|^\s*转发微博\s*(?=//@|$)"
                     r"|(?:回复|reply)\s*@[^\s:：]{1,30}\s*[:：]\s*",
                     re.IGNORECASE | re.DOTALL)
_URL = re.compile(
    r"(?:(?:https?|ftp)://|www\.)[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]+(?<![.,!?:;)\]'])"
    r"|(?<![A-Za-z0-9.])t\.cn/[A-Za-z0-9]+|网页链接",
    re.IGNORECASE,
)
_MENTION = re.compile(r"(?<![A-Za-z0-9._%+\-])@[\w\-]{1,30}[:：]?")
_TOPIC = re.compile(r"#[^#\s][^#\n]{0,48}#")
# Emoji: pictographs (minus ©, ®, ™ which are ordinary text), skin tones, keycaps, flags,
# variation selector 16 and joiners.
_EMOJI = regex.compile(r"(?V1)[\p{Extended_Pictographic}--[\u00a9\u00ae\u2122]]"
                       r"|[\U0001F3FB-\U0001F3FF\u20e3\ufe0f\u200d]|\p{Regional_Indicator}")
_UNSPACE = re.compile(f"(?<=[{_CJK}]) +(?=[{_JOINABLE}])|(?<=[{_JOINABLE}]) +(?=[{_CJK}])")

# -- privacy ---------------------------------------------------------------------------------
PLACEHOLDERS = {"email": "<邮箱>", "id_card": "<身份证>", "bank_card": "<银行卡>", "phone": "<电话>",
                "landline": "<电话>"}
_EMAIL = re.compile(r"(?<![A-Za-z0-9._%+\-])[A-Za-z0-9][A-Za-z0-9._%+\-]*@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*"
                    r"\.[A-Za-z]{2,}(?![A-Za-z])")
# 18-digit resident ID: region (6), birth date YYYYMMDD, sequence (3), check digit.
_ID_CARD = re.compile(r"(?<![0-9])[1-9]\d{5}(?:18|19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])"
                      r"\d{3}[0-9Xx](?![0-9])")
# 16-19 digits, bare or as groups of four with one consistent separator.
_BANK_CARD = re.compile(r"(?<![0-9])(?:\d{16,19}|\d{4}([ -])\d{4}\1\d{4}\1\d{4}(?:\1?\d{1,3})?)(?![0-9])")
_PHONE = re.compile(r"(?<![0-9+])(?:(?:\+|00)?86[ -]?|\(\+?86\)[ -]?)?1[3-9]\d(?:[ -]?\d{4}){2}(?![0-9])")
# Landline: area code (010, 02x, 0[3-9]xx) with a separator or in brackets, then a local
# number of 7-8 digits not starting with 0/1. A bare run of digits is not taken for one.
_LANDLINE = re.compile(r"(?<![0-9])(?:\(0(?:10|2\d|[3-9]\d{2})\)[ -]?|0(?:10|2\d|[3-9]\d{2})[ -])[2-9]\d{6,7}(?![0-9])")

_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"


def id_card_valid(number: str) -> bool:
    """GB 11643-1999 check digit of an 18-character resident ID number."""
    if len(number) != 18 or not number[:17].isdigit():
        return False
    total = sum(int(d) * w for d, w in zip(number[:17], _ID_WEIGHTS))
    return _ID_CHECK[total % 11] == number[17].upper()


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def bank_card_valid(number: str) -> bool:
    """16-19 digits, an issuer prefix of a payment card (UnionPay/Discover 6, Visa 4,
    Mastercard 5 and 2221-2720, JCB/Amex 3) and the Luhn check. The prefix test keeps
    date-led order numbers (2023…) out; Luhn alone passes one random number in ten."""
    digits = re.sub(r"[ -]", "", number)
    if not 16 <= len(digits) <= 19:
        return False
    if not (digits[0] in "3456" or 2221 <= int(digits[:4]) <= 2720):
        return False
    return luhn_valid(digits)


# -- the rule list ----------------------------------------------------------------------------
Rule = tuple[str, Callable[[str], str]]


def _sub(pattern, repl="", guard: Callable[[str], Any] | None = None) -> Callable[[str], str]:
    """pattern.sub(repl, text); a cheap `guard` test skips the regex scan on most turns."""
    sub = functools.partial(pattern.sub, repl)
    if guard is None:
        return sub
    return lambda text: sub(text) if guard(text) else text


def _checked_sub(pattern, valid: Callable[[str], bool], placeholder: str) -> Callable[[str], str]:
    def fn(text: str) -> str:
        if not _DIGIT_RUN.search(text):
            return text
        return pattern.sub(lambda m: placeholder if valid(m.group(0)) else m.group(0), text)
    return fn


_DIGIT_RUN = re.compile(r"\d\d\d")


# Chinese punctuation as Chinese input methods type it. NFKC would make it ASCII ("，" -> ",",
# "……" -> "......"), and the model would then answer users in punctuation they never type.
KEEP_FULLWIDTH = "，。！？：；（）～…"
# Stand-ins during NFKC: Unicode noncharacters U+FDD0.., which never occur in interchanged text.
_PROTECT = {ord(ch): 0xFDD0 + i for i, ch in enumerate(KEEP_FULLWIDTH)}
_RESTORE = {v: k for k, v in _PROTECT.items()}


def _nfkc(text: str) -> str:
    if unicodedata.is_normalized("NFKC", text):
        return text
    return unicodedata.normalize("NFKC", text.translate(_PROTECT)).translate(_RESTORE)


def _has_url(text: str) -> bool:
    return "://" in text or "www." in text or "WWW." in text or "t.cn/" in text or "网页链接" in text


class RuleSet(list):
    """The ordered (name, function) pairs; `unspace` tells the final tidy-up to unspace too."""

    unspace = False


def _whitespace(text: str) -> str:
    return _WHITESPACE.sub(" ", text).strip()


def _invisible(text: str) -> str:
    return _STRAY_ZWJ.sub("", _INVISIBLE.sub("", text))


def build_rules(cfg: CleanConfig) -> RuleSet:
    """The ordered (name, function) list for one config; see the module docstring."""
    rules = RuleSet()
    rules.unspace = cfg.undo_spacing
    if cfg.nfkc:
        rules.append(("nfkc", _nfkc))
    rules.append(("invisible", _invisible))
    rules.append(("whitespace", _whitespace))
    if cfg.strip_reposts:
        rules.append(("repost", _sub(_REPOST, guard=lambda t: "@" in t or "转发微博" in t)))
    if cfg.strip_urls:
        rules.append(("url", _sub(_URL, guard=_has_url)))
    if cfg.strip_mentions:
        rules.append(("mention", _sub(_MENTION, guard=lambda t: "@" in t)))
    if cfg.strip_topics:
        rules.append(("topic", _sub(_TOPIC, guard=lambda t: t.count("#") >= 2)))
    if cfg.emoji == "remove":
        rules.append(("emoji", _sub(_EMOJI)))
    if cfg.undo_spacing:
        rules.append(("unspace", _sub(_UNSPACE)))
    if cfg.privacy:
        rules += [
            ("email", _sub(_EMAIL, PLACEHOLDERS["email"], guard=lambda t: "@" in t)),
            ("id_card", _checked_sub(_ID_CARD, id_card_valid, PLACEHOLDERS["id_card"])),
            ("bank_card", _checked_sub(_BANK_CARD, bank_card_valid, PLACEHOLDERS["bank_card"])),
            ("phone", _sub(_PHONE, PLACEHOLDERS["phone"], guard=_DIGIT_RUN.search)),
            ("landline", _sub(_LANDLINE, PLACEHOLDERS["landline"], guard=_DIGIT_RUN.search)),
        ]
    for pattern, replacement in cfg.rules:
        rules.append((f"rule:{pattern}", _sub(re.compile(pattern), replacement)))
    n = cfg.max_repeat_chars
    repeat = re.compile(r"(\D)\1{%d,}" % n)
    rules.append(("repeat", lambda text: repeat.sub(lambda m: m.group(1) * n, text)))
    return rules


@functools.lru_cache(maxsize=16)
def _rules_for(cfg_json: str) -> RuleSet:
    return build_rules(CleanConfig.model_validate_json(cfg_json))


def _apply(text: str, rules: RuleSet, hits: Counter | None) -> str:
    for name, fn in rules:
        new = fn(text)
        if new != text:
            if hits is not None:
                hits[name] += 1
            text = new
    # Removals leave double or edge spaces behind, and rules can turn Latin into CJK
    # ("emmm 好" -> "呃 好"); tidying that up is not a rule of its own.
    text = _SPACES.sub(" ", text).strip()
    return _UNSPACE.sub("", text) if rules.unspace else text


def _limit(text: str, cfg: CleanConfig, hits: Counter | None) -> str:
    if len(text) > cfg.max_turn_chars:
        text = text[: cfg.max_turn_chars].rstrip()
        if hits is not None:
            hits["too_long"] += 1
    if len(text) < max(cfg.min_turn_chars, 1):
        if hits is not None:
            hits["too_short"] += 1
        return ""
    return text


def clean_text(text: str, cfg: CleanConfig, hits: Counter | None = None) -> str:
    """Clean one turn; "" when it is removed (too short after cleaning). `hits` counts
    the rules that changed it."""
    if not isinstance(text, str):
        text = "" if text is None else str(text)
    return _limit(_apply(text, _rules_for(cfg.model_dump_json()), hits), cfg, hits)


def clean_dialogue(turns: Sequence[str], cfg: CleanConfig, rules: RuleSet | None = None) -> tuple[list[str], str, Counter]:
    """Clean one dialogue: (turns, drop_reason, rule hits)."""
    rules = rules if rules is not None else _rules_for(cfg.model_dump_json())
    hits: Counter = Counter()
    cleaned = [_limit(_apply(t if isinstance(t, str) else ("" if t is None else str(t)), rules, hits), cfg, hits)
               for t in turns]
    kept = _longest_run(cleaned)
    lost = sum(1 for t in cleaned if t) - len(kept)
    if lost:
        hits["context_gap"] += lost
    if len(kept) > cfg.max_turns:
        hits["max_turns"] += len(kept) - cfg.max_turns
        kept = kept[-cfg.max_turns:]
    if not kept:
        reason = "empty_after_cleaning"
    elif len(kept) < cfg.min_turns:
        reason = "too_few_turns"
    else:
        reason = ""
    return kept, reason, hits


def _longest_run(turns: list[str]) -> list[str]:
    """The longest run of consecutive non-empty turns; on a tie the later run (it holds the reply)."""
    best: tuple[int, int] = (0, 0)
    start = 0
    for i, t in enumerate(turns + [""]):
        if not t:
            if i - start >= best[1] - best[0] and i > start:
                best = (start, i)
            start = i + 1
    return turns[best[0]:best[1]]


# -- batches --------------------------------------------------------------------------------
def _column(batch: Any, name: str) -> list:
    """A column as a Python list, from a pyarrow Table or a dict of lists / numpy arrays."""
    col = batch.column(name) if hasattr(batch, "column_names") else batch[name]
    return col.to_pylist() if hasattr(col, "to_pylist") else list(col)


def _columns(batch: Any) -> list[str]:
    return list(batch.column_names) if hasattr(batch, "column_names") else list(batch.keys())


def as_turn_lists(column: Iterable) -> list[list[str]]:
    """Turns as plain lists of str. Ray's numpy batches hold them as numpy object arrays, and
    handing those back makes Ray store the column as pickled objects instead of list<string>."""
    out = []
    for turns in column:
        if turns is None:
            out.append([])
        elif isinstance(turns, str):  # one bare utterance: a one-turn dialogue
            out.append([turns])
        else:
            out.append([t if isinstance(t, str) else ("" if t is None else str(t)) for t in turns])
    return out


def with_columns(batch: Any, new: dict[str, list], types: dict | None = None) -> Any:
    """The batch with columns added or replaced, in the batch's own type. For a pyarrow
    Table the Arrow type comes from `types`, else DIALOGUE_SCHEMA, else inference."""
    if hasattr(batch, "column_names"):
        import pyarrow as pa

        from zhchat.tables import DIALOGUE_SCHEMA

        for name, values in new.items():
            typ = (types or {}).get(name) or (DIALOGUE_SCHEMA.field(name).type if name in DIALOGUE_SCHEMA.names else None)
            arr = pa.array(values, type=typ)
            if name in batch.column_names:
                batch = batch.set_column(batch.column_names.index(name), name, arr)
            else:
                batch = batch.append_column(name, arr)
        return batch
    out = dict(batch)
    out.update(new)
    return out


def clean_batch(batch: Any, cfg: CleanConfig) -> Any:
    """Clean every dialogue of a batch (DIALOGUE_SCHEMA rows); adds `drop_reason` and
    `rule_hits` (JSON {rule: turns changed or removed}). Rows are never dropped here."""
    rules = _rules_for(cfg.model_dump_json())
    turns_out, reasons, hits_out = [], [], []
    for turns in as_turn_lists(_column(batch, "turns")):
        kept, reason, hits = clean_dialogue(turns, cfg, rules)
        turns_out.append(kept)
        reasons.append(reason)
        hits_out.append(json.dumps(dict(sorted(hits.items())), ensure_ascii=False))
    new: dict[str, list] = {"turns": turns_out, "drop_reason": reasons, "rule_hits": hits_out}
    if "system" in _columns(batch):
        new["system"] = ["" if s is None else _apply(str(s), rules, None) for s in _column(batch, "system")]
    return with_columns(batch, new)


def summarize_hits(rule_hits_column: Iterable) -> dict[str, dict[str, int]]:
    """{rule: {"turns": turns changed, "dialogues": dialogues with at least one}} from a
    column of rule_hits JSON strings (or dicts); empty/None entries count as no hits."""
    out: dict[str, dict[str, int]] = {}
    for item in rule_hits_column:
        if item is None or item == "":
            continue
        hits = json.loads(item) if isinstance(item, (str, bytes)) else item
        for rule, n in hits.items():
            if n:
                h = out.setdefault(rule, {"turns": 0, "dialogues": 0})
                h["turns"] += int(n)
                h["dialogues"] += 1
    return dict(sorted(out.items()))


# -- dedup ----------------------------------------------------------------------------------
KEY = "_dedup_key"
DEDUP_MODES = ("exact", "normalized")


def _normalize(turn: str) -> str:
    # Drop punctuation (P*), symbols (S*, incl. emoji), separators (Z*) and other (C*).
    return "".join(ch for ch in unicodedata.normalize("NFKC", turn).casefold()
                   if unicodedata.category(ch)[0] not in "PSZC")


def dedup_key(turns: Sequence[str], mode: str) -> str:
    """A short hash of the dialogue's turns ("exact") or of the turns with punctuation,
    symbols, white space and case removed ("normalized"). Turn boundaries count."""
    if mode == "exact":
        parts = list(turns)
    elif mode == "normalized":
        parts = [_normalize(t) for t in turns]
    else:
        raise ValueError(f"dedup mode must be one of {DEDUP_MODES}, got {mode!r}")
    return hashlib.blake2b(json.dumps(parts, ensure_ascii=False).encode("utf-8"), digest_size=16).hexdigest()


def _add_key(batch, mode: str):
    import pyarrow as pa

    keys = [dedup_key(t, mode) for t in as_turn_lists(batch.column("turns").to_pylist())]
    return batch.append_column(KEY, pa.array(keys, pa.string()))


def _mark_duplicates(block):
    """Rows of one key are all in this block (the shuffle put them there): sort by
    (key, id, source); the first row of each key is kept, the others point at it."""
    import numpy as np
    import pyarrow as pa

    order = [(c, "ascending") for c in (KEY, "id", "source") if c in block.column_names]
    block = block.sort_by(order)
    n = block.num_rows
    keys = block.column(KEY).to_numpy(zero_copy_only=False)
    ids = block.column("id").to_numpy(zero_copy_only=False)
    first = np.ones(n, dtype=bool)
    first[1:] = keys[1:] != keys[:-1]
    first_row = np.maximum.accumulate(np.where(first, np.arange(n), 0))
    block = block.append_column("_dup", pa.array(~first, pa.bool_()))
    return block.append_column("duplicate_of", pa.array(np.where(first, "", ids[first_row]).tolist(), pa.string()))


def _select(batch, duplicates: bool):
    import pyarrow.compute as pc

    mask = batch.column("_dup")
    out = batch.filter(mask if duplicates else pc.invert(mask))
    drop = [KEY, "_dup"] + ([] if duplicates else ["duplicate_of"])
    return out.drop_columns(drop)


def dedup(ds, mode: str, num_partitions: int | None = None):
    """(kept, duplicates) Ray datasets. Rows are grouped by `dedup_key` with Ray Data's
    shuffle (spills to disk, so larger than memory works); in each group the lowest id
    (then source) is kept. Duplicates get a `duplicate_of` column naming the kept id.

    The grouped result is materialised once (in the object store, spilling to disk as
    needed) because both outputs read it; otherwise the shuffle would run twice.
    mode "none" returns (ds, an empty dataset)."""
    if mode == "none":
        return ds, ds.limit(0)
    if mode not in DEDUP_MODES:
        raise ValueError(f"dedup mode must be one of {DEDUP_MODES + ('none',)}, got {mode!r}")
    from ray.data.context import ShuffleStrategy

    keyed = ds.map_batches(_add_key, fn_kwargs={"mode": mode}, batch_format="pyarrow")
    # What GroupedData.map_groups does, minus its Python call per group (millions of tiny
    # groups): co-locate each key in one block, then mark duplicates block by block.
    ctx = keyed.context
    if ctx.shuffle_strategy in (ShuffleStrategy.SHUFFLE_V2, ShuffleStrategy.HASH_SHUFFLE):
        shuffled = keyed.repartition(num_partitions or ctx.default_hash_shuffle_parallelism, keys=[KEY], sort=True)
    else:
        shuffled = keyed.sort(KEY)
    tagged = shuffled.map_batches(_mark_duplicates, batch_size=None, batch_format="pyarrow")
    tagged = tagged.materialize()
    kept = tagged.map_batches(_select, fn_kwargs={"duplicates": False}, batch_format="pyarrow")
    dups = tagged.map_batches(_select, fn_kwargs={"duplicates": True}, batch_format="pyarrow")
    return kept, dups
