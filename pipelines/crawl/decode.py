"""Bytes to text: charset from the HTTP header, then <meta>, then detection — and a check
that the declared charset is not a lie (Chinese sites often declare one and serve another).

GB2312 and GBK declarations decode as GB18030 (a superset: pages labelled GB2312 routinely
use GBK characters), Big5 as Big5-HKSCS (what browsers do), Latin-1 as cp1252.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

import charset_normalizer
from charset_normalizer.md import mess_ratio

# Declared name (after codecs.lookup) -> codec we really use.
_SUPERSETS = {
    "gb2312": "gb18030", "gbk": "gb18030", "cp936": "gb18030", "hz": "gb18030",
    "big5": "big5hkscs", "cp950": "big5hkscs",
    "latin_1": "cp1252", "iso8859-1": "cp1252", "ascii": "cp1252",
}
_META = re.compile(
    rb"""<meta[^>]+?charset\s*=\s*["']?\s*([A-Za-z0-9_\-:.]+)""", re.IGNORECASE)
_HEADER = re.compile(r"""charset\s*=\s*["']?\s*([A-Za-z0-9_\-:.]+)""", re.IGNORECASE)
# Above this mess ratio (charset_normalizer's mojibake measure) a clean-looking declared
# decoding is double-checked against detection; correct CJK text scores ~0.
_SUSPICIOUS = 0.05


@dataclass
class Decoded:
    text: str
    charset: str           # codec used, e.g. "gb18030"
    declared: str          # what the header or <meta> said ("" if nothing), as written
    mismatch: bool         # declared charset was wrong (did not decode, or made mojibake)


_ALIASES = {"x-gbk": "gbk", "x-gb18030": "gb18030", "x-big5": "big5", "big5-hkscs": "big5hkscs",
            "x-sjis": "shift_jis", "unicode": "utf-8", "utf8mb4": "utf-8"}


def canonical(name: str) -> str | None:
    """Codec we decode a declared charset with, or None if Python does not know it."""
    name = name.strip().strip("\"'").lower()
    try:
        py = codecs.lookup(_ALIASES.get(name, name)).name
    except LookupError:
        return None
    return _SUPERSETS.get(py, py)


def header_charset(content_type: str) -> str:
    m = _HEADER.search(content_type or "")
    return m.group(1) if m else ""


def meta_charset(body: bytes) -> str:
    """charset from <meta charset> or <meta http-equiv content="...; charset=">, first 4 KiB only
    (browsers look at 1 KiB; some CMSs put long scripts first)."""
    m = _META.search(body[:4096])
    return m.group(1).decode("ascii", "replace") if m else ""


def _try(body: bytes, codec: str) -> str | None:
    try:
        return body.decode(codec)
    except (UnicodeDecodeError, LookupError):
        return None


def _mess(text: str) -> float:
    # Only the non-ASCII runs: markup would dilute the measure of the text itself.
    sample = "".join(re.findall(r"[^\x00-\x7f]+[\x20-\x7f]{0,3}", text[:200_000]))
    return mess_ratio(sample, maximum_threshold=1.0) if sample else 0.0


def _detect(body: bytes) -> tuple[str, str] | None:
    """(codec, text) that charset-normalizer finds most plausible, or None."""
    if not body:
        return None
    best = charset_normalizer.from_bytes(body[:200_000]).best()
    if best is None:
        return None
    codec = canonical(best.encoding) or best.encoding
    text = _try(body, codec)
    return (codec, text) if text is not None else None


def _is_utf8(body: bytes) -> bool:
    return not body.isascii() and _try(body, "utf-8") is not None


def decode_body(body: bytes, content_type: str = "", is_html: bool = True) -> Decoded:
    """Decode a page. Header charset wins over <meta>; either is checked, and detection decides
    when the declared one fails strictly, or decodes to mojibake while another decodes cleanly."""
    if body.startswith(codecs.BOM_UTF8):
        return Decoded(body[3:].decode("utf-8", "replace"), "utf-8", header_charset(content_type), False)
    declared = header_charset(content_type) or (meta_charset(body) if is_html else "")
    codec = canonical(declared) if declared else None
    if codec is not None:
        text = _try(body, codec)
        if text is not None and codec != "utf-8" and _is_utf8(body):
            # Valid UTF-8 with non-ASCII bytes is almost never another charset by accident.
            return Decoded(body.decode("utf-8"), "utf-8", declared, True)
        if text is not None and "\ufffd" not in text and (codec == "utf-8" or _mess(text) < _SUSPICIOUS):
            # Strictly valid UTF-8 is UTF-8; other codecs decode mojibake without error, so check them.
            return Decoded(text, codec, declared, False)
        found = _detect(body)
        if found is not None and found[0] != codec and (text is None or _mess(found[1]) < _mess(text) / 2):
            return Decoded(found[1], found[0], declared, True)
        if text is not None:
            return Decoded(text, codec, declared, False)
        return Decoded(body.decode(codec, "replace"), codec, declared, True)
    # Nothing (usable) declared: UTF-8 if it is valid, else detection, else GB18030 with escapes.
    if body.isascii() or _is_utf8(body):
        return Decoded(body.decode("utf-8"), "utf-8", declared, False)
    found = _detect(body)
    if found is not None:
        return Decoded(found[1], found[0], declared, bool(declared))
    return Decoded(body.decode("gb18030", "replace"), "gb18030", declared, bool(declared))
