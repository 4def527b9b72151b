"""The reply blocklist (zhchat/blocklist.py): word entries with NFKC and case folding, regex
entries, replies that must pass, and StreamGuard's sentence-by-sentence release. Over HTTP
in tests/test_serve_api.py."""

from __future__ import annotations

import pytest

from zhchat.blocklist import Blocklist, StreamGuard


@pytest.fixture
def blocklist(tmp_path):
    f = tmp_path / "block.txt"
    f.write_text("# words, then patterns\n\nＡＢＣ\n坏蛋\nqq号\nre:\\d{3}\n", encoding="utf-8")
    return Blocklist.load(str(f))


@pytest.mark.parametrize("reply", ["abc", "ABC", "xAbCx", "ａｂｃ", "你是坏蛋吗", "加我ＱＱ号", "QQ号码", "电话123"])
def test_blocked(blocklist, reply):
    assert blocklist.match(reply)


@pytest.mark.parametrize("reply", ["abd", "a b c", "好蛋", "坏的蛋", "qq", "12 3", "", "你好，今天天气很好。"])
def test_must_pass(blocklist, reply):
    assert blocklist.match(reply) is None


def test_entry_forms_and_file_errors(tmp_path):
    assert Blocklist.load(None).match("anything") is None and not Blocklist.load(None)
    assert Blocklist(["abc"]).match("ＡＢＣ") == "abc"  # the text is normalised too, not only the entry
    assert Blocklist(["ﬁ"]).match("FI")  # NFKC ligature, then case folding
    assert Blocklist(patterns=["^好$"]).match("好") == "re:^好$"
    bad = tmp_path / "bad.txt"
    bad.write_text("ok\nre:(\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.txt:2"):
        Blocklist.load(str(bad))
    with pytest.raises(FileNotFoundError):
        Blocklist.load(str(tmp_path / "missing.txt"))


def test_stream_guard_releases_whole_checked_sentences(blocklist):
    g = StreamGuard(blocklist)
    assert g.feed("你好") == ("", False)          # no sentence end yet: nothing goes out
    assert g.feed("。今天") == ("你好。", False)   # the first sentence, checked
    assert g.feed("天气") == ("", False)
    assert g.feed("很好！明") == ("今天天气很好！", False)
    assert g.feed("天见", final=True) == ("明天见", False)  # the end releases the rest


def test_stream_guard_holds_a_word_split_across_deltas(blocklist):
    g = StreamGuard(blocklist)
    assert g.feed("你好。你是坏") == ("你好。", False)  # "坏" alone matches nothing, and is held
    out, blocked = g.feed("蛋吗？")
    assert blocked and out == ""
    assert "坏" not in g.text[:g.released]  # nothing of the blocked sentence went out
