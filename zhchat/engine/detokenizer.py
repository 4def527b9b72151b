"""Token ids to text: the incremental detokenizer that never emits half a character, and
the text of a single token (for logprobs)."""

from __future__ import annotations


class Detokenizer:
    """Incremental decoding that never emits half a character.

    Byte-level BPE can split a UTF-8 character across tokens; decoding such a prefix gives
    U+FFFD. New text is released only when the decoded window does not end in U+FFFD
    (the character is complete); bytes that never form a character are dropped.
    """

    def __init__(self, tokenizer):
        from zhchat.tokenizer import decode, is_wordpiece

        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # decode window start (context for tokenizers whose decoding depends on it)
        self.read = 0    # ids before this have been released
        # A BERT-style tokenizer's own decode puts a space between every character:
        # zhchat.tokenizer.decode reads it as normal Chinese (the window's first token gives
        # the context for the space between two Latin words).
        self._wordpiece = is_wordpiece(tokenizer)
        self._text = decode

    def _decode(self, ids: list[int]) -> str:
        if self._wordpiece:
            return self._text(self.tok, ids)
        return self.tok.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix:self.read])
        now = self._decode(self.ids[self.prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(before):].replace("\ufffd", "")
        return ""

    def flush(self) -> str:
        before = self._decode(self.ids[self.prefix:self.read])
        now = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return now[len(before):].replace("\ufffd", "")


class TokenTexts:
    """The text of one token decoded alone, cached (logprobs name up to 21 tokens a step).
    Special tokens show as themselves ("<|end|>"); a token holding part of a character is
    U+FFFD; an id beyond the tokenizer (vocabulary padding) is ""."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.size = len(tokenizer)
        self.cache: dict[int, str] = {}

    def __call__(self, token: int) -> str:
        text = self.cache.get(token)
        if text is None:
            text = self.tok.decode([token], skip_special_tokens=False) if 0 <= token < self.size else ""
            self.cache[token] = text
        return text
