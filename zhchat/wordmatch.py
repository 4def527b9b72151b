"""Finding the words of a word list in text: one Aho-Corasick automaton (pyahocorasick).

Words and text are compared after Unicode NFKC and case folding, so full-width and
half-width forms, upper and lower case are one word (ＱＱ, qq and QQ; 微信 and 微信). The
automaton runs over the normalised text in one pass, whatever the list's length; offsets
are mapped back, so `find_all` and `mask` work on the text as it was given.

File format (as zhchat/blocklist.py reads): one word per line, `#` starts a comment line,
blank lines are skipped. Lines starting with `re:` are regular expressions for the serving
blocklist; this matcher keeps them in `patterns` (unused here) instead of taking them for
words.

    m = WordMatcher.from_file("words.txt")
    m.find("...")          # the first word found (as written in the list), or None
    m.find_all("...")      # [(start, end, word)] in the original text, every occurrence
    m.mask("...", "*")     # each matched character replaced by "*"
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable
from pathlib import Path

import ahocorasick


def normalize(text: str) -> str:
    """NFKC then case folding: how words and text are compared."""
    return unicodedata.normalize("NFKC", text).casefold()


def _as_bytes(text: str) -> str:
    """The text's UTF-8 bytes, one latin-1 character each (what the automaton reads)."""
    return text.encode("utf-8").decode("latin-1")


def _byte_to_char(text: str) -> list[int] | None:
    """For each UTF-8 byte of `text`, the index of its character (None for ASCII: the same)."""
    if text.isascii():
        return None
    out: list[int] = []
    for i, ch in enumerate(text):
        c = ord(ch)
        out.extend([i] * (1 if c < 0x80 else 2 if c < 0x800 else 3 if c < 0x10000 else 4))
    return out


def _is_identity(text: str) -> bool:
    """True when normalize() keeps every character in place (one character for one), the
    usual case for Chinese text: offsets need no map."""
    return unicodedata.is_normalized("NFKC", text) and len(text.casefold()) == len(text)


def _clusters(text: str) -> list[tuple[int, int]]:
    """(start, end) of each base character with the combining marks after it: NFKC may
    compose those, so they are normalised together."""
    out: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(text) + 1):
        if i == len(text) or not (unicodedata.combining(text[i]) or "\u1160" <= text[i] <= "\u11ff"):
            out.append((start, i))
            start = i
    return out


def normalize_with_offsets(text: str) -> tuple[str, tuple[list[int], list[int]] | None]:
    """(normalised text, for each of its characters the (start, end) in `text` of what it came
    from, as two lists; None when that is the identity). A character that became several
    (ﬁ -> fi, ß -> ss) or several that became one (e + U+0301 -> é) map to the whole span."""
    if _is_identity(text):
        return text.casefold(), None
    parts: list[str] = []
    starts: list[int] = []
    ends: list[int] = []
    for s, e in _clusters(text):
        piece = normalize(text[s:e])
        parts.append(piece)
        if len(piece) == e - s:
            starts.extend(range(s, e))
            ends.extend(range(s + 1, e + 1))
        else:
            starts.extend([s] * len(piece))
            ends.extend([e] * len(piece))
    return "".join(parts), (starts, ends)


class WordMatcher:
    """Aho-Corasick over a word list, after NFKC and case folding."""

    def __init__(self, words: Iterable[str] = ()):
        self.words: list[str] = []
        self.patterns: list[str] = []
        self._automaton = ahocorasick.Automaton()
        seen: dict[str, str] = {}
        for w in words:
            w = w.strip()
            key = normalize(w)
            if not key or key in seen:
                continue
            seen[key] = w
            self.words.append(w)
            key = _as_bytes(key)
            self._automaton.add_word(key, (len(key), w))
        if seen:
            self._automaton.make_automaton()

    @classmethod
    def from_file(cls, path: str | Path) -> WordMatcher:
        p = Path(path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"word list not found: {path}")
        words, patterns = [], []
        for line in p.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            (patterns if line.startswith("re:") else words).append(line.removeprefix("re:"))
        m = cls(words)
        m.patterns = patterns
        return m

    def __bool__(self) -> bool:
        return bool(self.words)

    def __len__(self) -> int:
        return len(self.words)

    def find(self, text: str) -> str | None:
        """The first word found in `text` (the one ending first), as written in the list; None
        when there is none."""
        if not self.words or not text:
            return None
        for _end, (_n, word) in self._automaton.iter(_as_bytes(normalize(text))):
            return word
        return None

    def find_all(self, text: str) -> list[tuple[int, int, str]]:
        """Every occurrence of every word, overlapping ones included: (start, end, word) with
        start and end indices into the original `text`, sorted by start (longer first)."""
        if not self.words or not text:
            return []
        norm, origin = normalize_with_offsets(text)
        chars = _byte_to_char(norm)
        out = []
        for end, (n, word) in self._automaton.iter(_as_bytes(norm)):
            start = end - n + 1
            if chars is not None:
                start, end = chars[start], chars[end]
            if origin is None:
                out.append((start, end + 1, word))
            else:
                out.append((origin[0][start], origin[1][end], word))
        out.sort(key=lambda m: (m[0], -m[1]))
        return out

    def mask(self, text: str, char: str = "*") -> str:
        """`text` with every character of every match replaced by `char` (the length stays)."""
        spans = self.find_all(text)
        if not spans:
            return text
        chars = list(text)
        for s, e, _ in spans:
            for i in range(s, e):
                chars[i] = char
        return "".join(chars)
