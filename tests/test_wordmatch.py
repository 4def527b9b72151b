"""zhchat.wordmatch: Aho-Corasick over a word list after NFKC + case folding, offsets on the
original text, the same answers as a per-word `in` loop (what the serving blocklist did
before it used this matcher; the speed of both is bench/wordmatch.py's)."""

from __future__ import annotations

import random
import time

import pytest

from zhchat.wordmatch import WordMatcher, normalize_with_offsets


def test_find_full_width_and_case_are_one_word():
    m = WordMatcher(["微信", "QQ", "Ｂａｄ"])
    assert m.find("加我ＱＱ吧") == "QQ"
    assert m.find("加我qq吧") == "QQ"
    assert m.find("this is BAD") == "Ｂａｄ"           # the word as written in the list
    assert m.find("用微信联系") == "微信"
    assert m.find("什么都没有") is None
    assert m.find("") is None
    assert not WordMatcher([]) and WordMatcher([]).find("微信") is None
    assert len(WordMatcher(["a", "A", "ａ", " ", ""])) == 1   # one word after normalising; blanks dropped


def test_find_all_offsets_are_on_the_original_text():
    m = WordMatcher(["坏词", "abc", "词语", "fi"])
    text = "这是坏词语，ＡＢＣ和ﬁ"
    got = m.find_all(text)
    assert got == [(2, 4, "坏词"), (3, 5, "词语"), (6, 9, "abc"), (10, 11, "fi")]
    for s, e, _ in got[:3]:
        assert text[s:e] in ("坏词", "词语", "ＡＢＣ")
    assert text[10:11] == "ﬁ"                              # one ligature character became "fi"
    assert m.mask(text) == "这是***，***和*"
    assert m.mask(text, "□") == "这是□□□，□□□和□"
    assert m.mask("没有") == "没有"


def test_offsets_with_composition_and_expansion():
    # e + combining acute composes to é under NFKC; ① becomes 1; ß case-folds to ss
    m = WordMatcher(["café", "1号", "strasse"])
    text = "去cafe\u0301吧①号STRAßE"
    assert [text[s:e] for s, e, _ in m.find_all(text)] == ["cafe\u0301", "①号", "STRAßE"]
    assert m.mask(text) == "去*****吧**" + "******"
    norm, origin = normalize_with_offsets("ＡＢ")
    assert norm == "ab" and origin == ([0, 1], [1, 2])
    assert normalize_with_offsets("普通的中文") == ("普通的中文", None)   # the identity: no map built


def test_from_file_skips_comments_and_keeps_patterns(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text("# 注释\n坏词\n\n  空格词  \nre:b[a4]d\n", encoding="utf-8")
    m = WordMatcher.from_file(path)
    assert m.words == ["坏词", "空格词"] and m.patterns == ["b[a4]d"]
    assert m.find("有空格词") == "空格词" and m.find("b4d") is None
    with pytest.raises(FileNotFoundError, match="word list not found"):
        WordMatcher.from_file(tmp_path / "missing.txt")


def _word_list(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    han = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]
    words = set()
    while len(words) < n:
        if rng.random() < 0.85:
            words.add("".join(rng.choice(han) for _ in range(rng.randint(2, 4))))
        else:
            words.add("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 8))))
    return sorted(words)


def _replies(n: int, words: list[str], seed: int = 1) -> list[str]:
    """Chat-reply-sized texts (10-80 characters); one in ten holds a listed word."""
    rng = random.Random(seed)
    han = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]
    out = []
    for i in range(n):
        t = "".join(rng.choice(han) for _ in range(rng.randint(10, 80)))
        if i % 10 == 0:
            j = rng.randrange(len(t))
            t = t[:j] + rng.choice(words) + t[j:]
        out.append(t)
    return out


def naive_find(words: list[str], text: str) -> str | None:
    """The per-word loop: every normalised word looked for in the normalised text."""
    from zhchat.wordmatch import normalize

    low = normalize(text)
    return next((w for w in words if normalize(w) in low), None)


def test_same_answers_as_a_per_word_loop():
    from zhchat.blocklist import Blocklist

    words = _word_list(500, seed=3)
    texts = _replies(2000, words, seed=4)
    texts += ["ＡＢＣ" + words[0].upper(), words[-1].upper()]
    block, m = Blocklist(words), WordMatcher(words)
    for t in texts:
        assert (naive_find(words, t) is None) == (m.find(t) is None) == (block.match(t) is None), t
        found = m.find_all(t)
        for s, e, w in found:
            assert w.casefold() in t.casefold()[max(0, s - 2):e + 2].replace(" ", "") or w in t[s:e]
