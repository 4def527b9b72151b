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


def clean_dialogue(turns: Sequence[str], cfg: CleanConfig, rules: RuleSet | None = None,
                   system: str = "", words: Sequence[str] | None = None) -> tuple[list[str], str, Counter, str]:
    """Clean one dialogue: (turns, drop_reason, rule hits, drop detail). The detail says what
    a quality rule found (the word, the ad, the share); "" when kept or for the length rules.
    `words`: the sensitive-word list, when the caller has read it (else cfg.sensitive.words)."""
    rules = rules if rules is not None else _rules_for(cfg.model_dump_json())
    hits: Counter = Counter()
    raw = [t if isinstance(t, str) else ("" if t is None else str(t)) for t in turns]
    cleaned = [_limit(_apply(t, rules, hits), cfg, hits) for t in raw]
    kept = _longest_run(cleaned)
    lost = sum(1 for t in cleaned if t) - len(kept)
    if lost:
        hits["context_gap"] += lost
    if len(kept) > cfg.max_turns:
        hits["max_turns"] += len(kept) - cfg.max_turns
        kept = kept[-cfg.max_turns:]
    detail = ""
    if not kept:
        reason = "empty_after_cleaning"
    elif len(kept) < cfg.min_turns:
        reason = "too_few_turns"
    else:
        reason, detail = "", ""
        matcher = _sensitive_matcher(cfg, words)
        if matcher:
            if cfg.sensitive.action == "drop":
                word = next((w for w in map(matcher.find, kept + ([system] if system else [])) if w), None)
                if word:
                    reason, detail = "sensitive_word", word
            else:
                masked = [matcher.mask(t, cfg.sensitive.mask_char) for t in kept]
                hits["sensitive_mask"] += sum(a != b for a, b in zip(masked, kept))
                kept = masked
        if not reason:
            reason, detail = quality_check(raw, kept, cfg)
    return kept, reason, hits, detail


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


def clean_batch(batch: Any, cfg: CleanConfig, words: Sequence[str] | None = None) -> Any:
    """Clean every dialogue of a batch (DIALOGUE_SCHEMA rows); adds `drop_reason`,
    `drop_detail` (what a quality rule found) and `rule_hits` (JSON {rule: turns changed or
    removed}). Rows are never dropped here. `words`: the sensitive-word list (read once by
    the caller, so workers need not see the file); None reads cfg.sensitive.words."""
    rules = _rules_for(cfg.model_dump_json())
    has_system = "system" in _columns(batch)
    systems = ["" if s is None else str(s) for s in _column(batch, "system")] if has_system else None
    turns_out, reasons, details, hits_out = [], [], [], []
    for i, turns in enumerate(as_turn_lists(_column(batch, "turns"))):
        kept, reason, hits, detail = clean_dialogue(turns, cfg, rules, systems[i] if systems else "", words)
        turns_out.append(kept)
        reasons.append(reason)
        details.append(detail)
        hits_out.append(json.dumps(dict(sorted(hits.items())), ensure_ascii=False))
    new: dict[str, list] = {"turns": turns_out, "drop_reason": reasons, "drop_detail": details, "rule_hits": hits_out}
    if has_system:
        matcher = _sensitive_matcher(cfg, words) if cfg.sensitive.action == "mask" else None
        new["system"] = [matcher.mask(t, cfg.sensitive.mask_char) if matcher else t
                         for t in (_apply(s, rules, None) if s else "" for s in systems)]
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


# -- dialogue-level quality rules ----------------------------------------------------------------
# Run in this order after the text rules; the first that fires is the dialogue's drop_reason
# and what it found its drop_detail (config clean.quality and clean.sensitive):
#
#   sensitive_word  a word of the clean.sensitive.words list (Aho-Corasick, zhchat.wordmatch) in a
#                   turn or the system prompt; with action "mask" the words are masked instead
#                   (rule hit "sensitive_mask") and the dialogue stays
#   ads             ads and spam, on the raw turns (before links and numbers are scrubbed):
#                   a QQ/微信/VX handle with a number or an id, an ad phrase (quality.ad_words:
#                   加微信, 代购, 刷单 ...), a link beside a sales cue (购买, 下单, 优惠 ...), or a
#                   phrase of 4+ characters (2+ different letters) said 3+ times in a row in one
#                   turn (好消息！好消息！好消息！); the same ad across dialogues is the near-
#                   duplicate levels' (pipelines/dedup.py), the same turn twice repeated_turns'
#   not_chinese     Chinese characters under quality.min_chinese_share of the words (each Han
#                   character is one, a run of other letters is one)
#   repeated_turns  at least quality.max_repeated_turns of the turns after the first repeat an
#                   earlier turn (the same normalised text, or character-bigram Jaccard >= 0.8)
#   length_ratio    the reply and the turn before it differ in length by more than
#                   quality.max_length_ratio times
#   generic_reply   the reply (last turn) is only one of quality.generic_replies (punctuation,
#                   symbols, spaces and case ignored; the entries go through the text rules too)
#
# Near-duplicates and replies repeated across many contexts are pipelines/dedup.py's.
QUALITY_REASONS = ("sensitive_word", "ads", "not_chinese", "repeated_turns", "length_ratio", "generic_reply")

_NORM_DROP = regex.compile(r"[\p{P}\p{S}\p{Z}\p{C}]+")
_HAN = regex.compile(r"\p{Han}")
_OTHER_WORD = regex.compile(r"[^\W\d_\p{Han}]+")
# Contact handles: QQ/微信 spellings, an optional 号/是/:, then a number or a WeChat id.
_CONTACT = regex.compile(
    r"(?:qq|扣扣|企鹅|微信|威信|薇信|维信|v信|vx|wx|weixin|wechat|加v|\+v)\s*(?:号码?|号)?\s*(?:是|为)?\s*[:：]?\s*"
    r"(?:\d[\d\s-]{4,14}\d|[a-z][-_a-z0-9]{5,19})(?![a-z0-9])")
_SALES_CUE = regex.compile(r"购买|下单|优惠|折扣|领取|点击|戳|抢购|特价|店铺|淘宝|拼多多|京东|旗舰店|链接|进店|入口")
_REPEATED_PHRASE = regex.compile(r"(\S{4,12}?)\1{2,}")
_SPACE_RUN = regex.compile(r"\s+")


def normalize_text(text: str) -> str:
    """NFKC, case folded, without punctuation, symbols, white space and control characters:
    the text that the quality rules and pipelines/dedup.py's near-duplicate levels compare."""
    if not text:
        return ""
    return _NORM_DROP.sub("", unicodedata.normalize("NFKC", text).casefold())


@functools.lru_cache(maxsize=16)
def _matcher_for(words: tuple[str, ...]):
    from zhchat.wordmatch import WordMatcher

    return WordMatcher(words)


@functools.lru_cache(maxsize=4)
def _matcher_from_file(path: str, mtime: float):
    from zhchat.wordmatch import WordMatcher

    return WordMatcher.from_file(path)


def _sensitive_matcher(cfg: CleanConfig, words: Sequence[str] | None):
    if words is not None:
        return _matcher_for(tuple(words)) if words else None
    path = cfg.sensitive.words
    if not path:
        return None
    import os

    return _matcher_from_file(path, os.path.getmtime(path))


@functools.lru_cache(maxsize=16)
def _generic_set(entries: tuple[str, ...], cfg_json: str) -> frozenset[str]:
    rules = _rules_for(cfg_json)
    return frozenset(filter(None, (normalize_text(_apply(e, rules, None)) for e in entries)))


def _bigrams(text: str) -> set[str]:
    return {text[i:i + 2] for i in range(len(text) - 1)} if len(text) > 1 else {text}


def _ad_signal(raw: Sequence[str], cfg: CleanConfig) -> str:
    q = cfg.quality
    ads = _matcher_for(tuple(q.ad_words)) if q.ad_words else None
    for t in raw:
        if not t:
            continue
        low = unicodedata.normalize("NFKC", t).casefold()
        m = _CONTACT.search(low)
        if m:
            return f"contact: {m.group(0)}"
        if ads:
            w = ads.find(low)
            if w:
                return f"ad word: {w}"
        if _has_url(low) and _SALES_CUE.search(low):
            return "link with a sales cue"
        if len(low) >= 12:
            for m in _REPEATED_PHRASE.finditer(_SPACE_RUN.sub("", low)):
                if len(set(normalize_text(m.group(1)))) >= 2:  # not laughter (哈哈哈！×3)
                    return f"repeated: {m.group(1)}"
    return ""


def chinese_share(turns: Sequence[str]) -> float:
    """Han characters over words (a Han character is one word, a run of other letters one)."""
    text = "".join(turns)
    han = len(_HAN.findall(text))
    total = han + len(_OTHER_WORD.findall(text))
    return han / total if total else 0.0


def repeated_turns(turns: Sequence[str]) -> int:
    """How many turns after the first repeat an earlier one (same normalised text, or
    character-bigram Jaccard >= 0.8 for turns of 4+ characters)."""
    seen: list[tuple[str, set[str]]] = []
    n = 0
    for t in turns:
        key = normalize_text(t) or t
        grams = _bigrams(key) if len(key) >= 4 else None
        for k, g in seen:
            if k == key or (grams is not None and g is not None and len(grams & g) >= 0.8 * len(grams | g)):
                n += 1
                break
        seen.append((key, grams))
    return n


def quality_check(raw: Sequence[str], turns: Sequence[str], cfg: CleanConfig) -> tuple[str, str]:
    """(reason, detail) of the first quality rule a cleaned dialogue breaks, ("", "") if none.
    `raw`: its turns before cleaning (the ads rule reads them)."""
    q = cfg.quality
    if q.ads:
        found = _ad_signal(raw, cfg)
        if found:
            return "ads", found
    if q.min_chinese_share is not None and q.min_chinese_share > 0:
        share = chinese_share(turns)
        if share < q.min_chinese_share:
            return "not_chinese", f"{share:.2f}"
    if q.max_repeated_turns is not None and len(turns) >= 2:
        n = repeated_turns(turns)
        if n and n >= q.max_repeated_turns * (len(turns) - 1):
            return "repeated_turns", f"{n} of {len(turns) - 1}"
    if q.max_length_ratio is not None and len(turns) >= 2:
        a, b = len(turns[-2]), len(turns[-1])
        if max(a, b) > q.max_length_ratio * max(min(a, b), 1):
            return "length_ratio", f"{a}:{b}"
    if q.generic_replies:
        reply = normalize_text(turns[-1])
        if reply in _generic_set(tuple(q.generic_replies), cfg.model_dump_json()):
            return "generic_reply", turns[-1]
    return "", ""
