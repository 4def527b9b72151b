"""Words and regex patterns that a reply must not contain.

File format: one entry per line; `re:` starts a regular expression; `#` starts a comment
line; blank lines are ignored. Words match case-insensitively after NFKC normalisation,
so full-width and half-width spellings are the same word. Words are found with the same
Aho-Corasick matcher (zhchat/wordmatch.py) that preprocess's sensitive-word rule uses, so
data and serving can share one list: one pass per reply whatever the list's length
(3 us against 88 us for a per-word loop over 2,000 words, bench/wordmatch.py).
"""

from __future__ import annotations

import re
from pathlib import Path

# Streamed replies are released one sentence at a time when a blocklist is on, so a pattern
# is checked against whole sentences before any of them reaches the user.
SENTENCE_END = re.compile(r"[。！？!?；;\n…~]")


class Blocklist:
    def __init__(self, words: list[str] = (), patterns: list[str] = ()):
        from .wordmatch import WordMatcher

        self.words = [w for w in words if w.strip()]
        self._matcher = WordMatcher(self.words)
        self.patterns = []
        for p in patterns:
            try:
                self.patterns.append(re.compile(p))
            except re.error as e:
                raise ValueError(f"blocklist pattern {p!r} is not a valid regex: {e}") from e

    @classmethod
    def load(cls, path: str | None) -> "Blocklist":
        if not path:
            return cls()
        p = Path(path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"blocklist file not found: {path}")
        words, patterns = [], []
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("re:"):
                try:
                    re.compile(line[3:])
                except re.error as e:
                    raise ValueError(f"{path}:{n}: invalid regex {line[3:]!r}: {e}") from e
                patterns.append(line[3:])
            else:
                words.append(line)
        return cls(words, patterns)

    def __bool__(self) -> bool:
        return bool(self.words or self.patterns)

    def match(self, text: str) -> str | None:
        """The first entry found in text (for the log), or None."""
        if not text:
            return None
        word = self._matcher.find(text)
        if word is not None:
            return word
        for p in self.patterns:
            if p.search(text):
                return "re:" + p.pattern
        return None


class StreamGuard:
    """Releases streamed text sentence by sentence, checking everything so far first."""

    def __init__(self, blocklist: Blocklist):
        self.blocklist = blocklist
        self.text = ""
        self.released = 0

    def feed(self, delta: str, final: bool = False) -> tuple[str, bool]:
        """(text safe to send now, blocked?)."""
        self.text += delta
        if self.blocklist.match(self.text):
            return "", True
        end = len(self.text)
        if not final:
            last = None
            for m in SENTENCE_END.finditer(self.text, self.released):
                last = m
            end = last.end() if last else self.released
        out, self.released = self.text[self.released:end], max(end, self.released)
        return out, False
