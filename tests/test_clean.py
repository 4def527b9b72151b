"""Cleaning rules one by one (with counter-examples), rule_hits, batches, the quality and
sensitive-word rules, and cleaning on Ray Data. Dedup is tests/test_dedup.py's."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest

from pipelines.clean import (
    QUALITY_REASONS, chinese_share, clean_batch, clean_dialogue, clean_text, id_card_valid, luhn_valid,
    repeated_turns, summarize_hits,
)
from zhchat.config import CleanConfig
from zhchat.tables import DIALOGUE_SCHEMA, dialogue_row

CFG = CleanConfig()
# Every dialogue-level quality rule off: the tests of the text and length rules use tiny
# dialogues ("a", "好") that those rules would remove.
QUALITY_OFF = {"generic_replies": [], "ads": False, "min_chinese_share": None, "max_repeated_turns": None,
               "max_length_ratio": None}


def clean(text: str, **overrides) -> tuple[str, dict]:
    hits: Counter = Counter()
    out = clean_text(text, CleanConfig(**overrides) if overrides else CFG, hits)
    return out, dict(hits)


def luhn_complete(prefix: str) -> str:
    """prefix + the Luhn check digit (a valid test card number)."""
    for d in "0123456789":
        if luhn_valid(prefix + d):
            return prefix + d
    raise AssertionError("no check digit")


def id_complete(first17: str) -> str:
    for d in "0123456789X":
        if id_card_valid(first17 + d):
            return first17 + d
    raise AssertionError("no check digit")


# -- text rules -------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected, rule", [
    ("ＡＢＣ１２３", "ABC123", "nfkc"),
    ("１０：３０见", "10：30见", "nfkc"),                # Chinese punctuation stays full-width
    ("你好\u3000世界", "你好世界", "nfkc"),           # ideographic space -> space -> unspaced
    ("zero\u200bwidth", "zerowidth", "invisible"),
    ("  多个   空格\n换行 ", "多个空格换行", "whitespace"),
    ("说得对//@张三:哈哈//@李四:原文", "说得对", "repost"),
    ("转发微博", "", "repost"),
    ("回复@王五:好的", "好的", "repost"),
    ("看这个 http://t.cn/A6abc 好玩", "看这个好玩", "url"),
    ("链接https://example.com/a?b=1,真不错", "链接,真不错", "url"),
    ("快看www.weibo.com/u/1", "快看", "url"),
    ("@小明 你好", "你好", "mention"),
    ("#今日话题#大家好", "大家好", "topic"),
])
def test_rule_examples(text, expected, rule):
    out, hits = clean(text)
    assert out == expected
    assert hits.get(rule) == 1


@pytest.mark.parametrize("text", [
    "我转发微博了吗",          # not Weibo's default repost text
    "C# 和 F# 都行",          # not a #topic#
    "Hello world",
    "房间233",                # a bare 233 is a number
    "乐呵呵的", "笑呵呵地说",    # 呵呵 inside words
    "哈哈", "嘿嘿", "哇哇大哭",   # ordinary doubled forms
    "1000000元",              # digit runs are never cut
    "日期2023-11-25 10:30",
])
def test_text_left_alone(text):
    out, hits = clean(text)
    assert out == text
    assert hits == {}


def test_email_is_not_a_mention():
    out, hits = clean("我的邮箱是abc.def@qq.com哦")
    assert out == "我的邮箱是<邮箱>哦"
    assert hits == {"email": 1}
    out, _ = clean("我的邮箱是abc.def@qq.com哦", privacy=False)
    assert out == "我的邮箱是abc.def@qq.com哦"


@pytest.mark.parametrize("text, expected", [
    ("我 爱 你", "我爱你"),
    ("I love 北 京", "I love 北京"),
    ("你 去 那 儿 ?", "你去那儿?"),                     # LCCC per-character
    ("我 喜欢 这部 电影 , 很 好看", "我喜欢这部电影,很好看"),  # Douban per-word
    ("我 有 3 个 苹果", "我有3个苹果"),
    ("北 京 is great", "北京 is great"),
    ("Hello world 你好", "Hello world 你好"),
])
def test_unspacing(text, expected):
    assert clean(text)[0] == expected
    assert clean(text, undo_spacing=False)[0] == text


def test_laughter_and_filler_rules():
    assert clean("呵呵")[0] == "笑"
    assert clean("呵呵呵呵呵呵")[0] == "笑"
    assert clean("呵 呵 呵")[0] == "笑"                   # LCCC spacing undone first
    assert clean("呵呵，你说呢")[0] == "笑，你说呢"
    assert clean("哈哈哈哈哈哈哈")[0] == "哈哈"
    assert clean("hhhhh")[0] == "哈哈"
    assert clean("hahaha 好笑")[0] == "哈哈好笑"
    assert clean("2333333")[0] == "哈哈"
    assert clean("啊啊啊啊")[0] == "啊"
    assert clean("emmm 这个")[0] == "呃这个"
    assert clean("怎么办？？？")[0] == "怎么办？"
    assert clean("真的吗。。。")[0] == "真的吗……"
    assert clean("真的吗...")[0] == "真的吗……"
    assert clean("wait...")[0] == "wait..."
    assert clean("好的～～～")[0] == "好的～"
    assert clean("嗯………")[0] == "嗯……"
    assert clean("嗯……")[0] == "嗯……"
    out, hits = clean("呵呵")
    assert hits == {"rule:(?<![乐笑傻憨喜])呵{2,}": 1}
    assert clean("呵呵", rules=[])[0] == "呵呵"           # rules are configurable


def test_custom_rules_run_in_order():
    cfg = dict(rules=[(r"猫", "狗"), (r"狗狗", "小狗")])
    assert clean("猫猫", **cfg)[0] == "小狗"


def test_emoji_policy():
    text = "好的😀👍🏻 谢谢❤️ 👨‍👩‍👧 ©2024"
    assert clean(text)[0] == text                         # keep is the default
    out, hits = clean(text, emoji="remove")
    assert out == "好的谢谢 ©2024"
    assert hits["emoji"] == 1


def test_repeated_characters_cut():
    assert clean("好好好好好好好好")[0] == "好好好好"
    assert clean("好好好好好好好好", max_repeat_chars=2)[0] == "好好"
    assert clean("------")[0] == "----"
    assert clean("电话13888888888")[0] == "电话<电话>"       # privacy before the cut


# -- privacy ----------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("电话13812345678", "电话<电话>"),
    ("电话 +86 138-1234-5678 找我", "电话<电话>找我"),
    ("打 8613912345678", "打<电话>"),
    ("微信 159 1234 5678", "微信<电话>"),
    ("座机010-62345678", "座机<电话>"),
    ("座机(0755)23456789", "座机<电话>"),
    ("联系 zhang.san+chat@example.com.cn", "联系<邮箱>"),
])
def test_privacy_placeholders(text, expected):
    assert clean(text)[0] == expected


def test_id_card_needs_a_valid_check_digit():
    good = id_complete("11010519491231002")
    assert good == "11010519491231002X"
    assert clean(f"身份证{good}")[0] == "身份证<身份证>"
    bad = good[:-1] + "1"
    assert clean(f"身份证{bad}")[0] == f"身份证{bad}"       # checksum fails: not an ID


def test_bank_card_needs_luhn_and_a_card_prefix():
    card = luhn_complete("622202131234567")
    assert clean(f"卡号{card}")[0] == "卡号<银行卡>"
    spaced = " ".join(card[i:i + 4] for i in range(0, 16, 4))
    assert clean(f"卡号 {spaced}")[0] == "卡号<银行卡>"
    assert clean("visa 4111 1111 1111 1111")[0] == "visa <银行卡>"
    wrong = card[:-1] + str((int(card[-1]) + 1) % 10)
    assert clean(f"卡号{wrong}")[0] == f"卡号{wrong}"       # Luhn fails


@pytest.mark.parametrize("text", [
    "订单号2023113812345678901",   # a phone number inside a longer digit run
    "订单号202311250000123456",    # 18 digits: no valid birth date at the ID position
    luhn_complete("202311250000123") + "是订单号",  # passes Luhn but a date, not a card prefix
    "快递单号 SF1234567890123",
    "价格12345678元",
    "编号01012345678",              # a bare digit run is not a landline
    "QQ号 2333 号房间",
])
def test_privacy_false_positives(text):
    assert clean(text)[0] == clean(text, privacy=False)[0]


# -- per dialogue -----------------------------------------------------------------------------
def batch_of(dialogues: list[list[str]], system: str = "") -> dict:
    rows = [dialogue_row(d, "test.jsonl", system) for d in dialogues]
    return {k: [r[k] for r in rows] for k in DIALOGUE_SCHEMA.names}


def test_clean_batch_hits_and_drop_reasons():
    cfg = CleanConfig(max_turns=3, min_turns=2, max_turn_chars=10, quality=QUALITY_OFF)
    batch = batch_of([
        ["看 http://a.cn 哦", "好 的", "http://b.cn", "呵呵", "@某人"],  # url x2, gap, empty ones
        ["一二三四五六七八九十十一", "好"],                             # too long
        ["http://x.cn", "@某人"],                                       # nothing left
        ["你好", ""],                                                   # one turn left
        ["a", "b", "c", "d", "e"],                                      # max_turns
    ])
    out = clean_batch(batch, cfg)
    assert out["turns"] == [["看哦", "好的"], ["一二三四五六七八九十", "好"], [], ["你好"], ["c", "d", "e"]]
    assert out["drop_reason"] == ["", "", "empty_after_cleaning", "too_few_turns", ""]
    hits = [json.loads(h) for h in out["rule_hits"]]
    # dialogue 0: turns 1 and 3 had URLs; 3 and 5 became empty; the run after the gap (笑)
    # is shorter than the first run, so it goes
    assert hits[0]["url"] == 2 and hits[0]["mention"] == 1 and hits[0]["too_short"] == 2
    assert hits[0]["context_gap"] == 1 and hits[0]["unspace"] == 2
    assert hits[1] == {"too_long": 1}
    assert hits[4] == {"max_turns": 2}
    assert out["id"] == batch["id"]                       # other columns pass through
    summary = summarize_hits(out["rule_hits"])
    assert summary["url"] == {"turns": 3, "dialogues": 2}
    assert summary["too_short"]["dialogues"] == 3


def test_clean_batch_numpy_and_pyarrow_batches():
    dialogues = [["我 爱 你", "呵呵"], ["电话13812345678", "好"]]
    expected = [["我爱你", "笑"], ["电话<电话>", "好"]]
    plain = batch_of(dialogues)
    numpy_batch = {k: np.array(v, dtype=object) for k, v in plain.items()}
    numpy_batch["turns"] = np.array([np.array(t, dtype=object) for t in dialogues], dtype=object)
    cfg = CleanConfig(quality=QUALITY_OFF)
    out = clean_batch(numpy_batch, cfg)
    assert out["turns"] == expected and all(type(t) is list for t in out["turns"])
    table = pa.Table.from_pydict(plain, schema=DIALOGUE_SCHEMA)
    out = clean_batch(table, cfg)
    assert isinstance(out, pa.Table)
    assert out.schema.field("turns").type == pa.list_(pa.string())
    assert out.column("turns").to_pylist() == expected
    assert out.column("drop_reason").to_pylist() == ["", ""]


def test_system_prompt_is_cleaned_but_not_counted():
    out = clean_batch(batch_of([["你好", "好"]], system="我的电话13812345678"), CFG)
    assert out["system"] == ["我的电话<电话>"]
    assert out["rule_hits"] == ["{}"]




# -- dialogue-level quality rules ------------------------------------------------------------------
def verdict(turns: list[str], **overrides) -> tuple[str, str]:
    """(drop_reason, drop_detail) of one dialogue under the default config plus overrides."""
    cfg = CleanConfig(**overrides) if overrides else CFG
    _, reason, _, detail = clean_dialogue(turns, cfg)
    return reason, detail


def test_every_quality_rule_is_on_by_default():
    q = CFG.quality
    assert q.generic_replies and q.ads and q.ad_words
    assert q.min_chinese_share and q.max_repeated_turns and q.max_length_ratio
    assert CFG.sensitive.words is None  # no list shipped: off until one is given
    assert set(QUALITY_REASONS) == {"sensitive_word", "ads", "not_chinese", "repeated_turns", "length_ratio",
                                    "generic_reply"}


@pytest.mark.parametrize("turns, detail", [
    (["今天去哪儿玩？", "好的！"], "好的！"),
    (["我到家了", "哈哈哈哈哈哈"], "哈哈"),           # the text rules run first: 哈哈哈哈哈哈 -> 哈哈
    (["你看这个", "嗯嗯嗯嗯"], "嗯"),
    (["晚上吃什么", "OK"], "OK"),                    # case ignored
])
def test_generic_reply(turns, detail):
    assert verdict(turns) == ("generic_reply", detail)


def test_generic_reply_counter_examples_and_settings():
    assert verdict(["今天去哪儿玩？", "好的，明天见"]) == ("", "")   # more than the generic word
    assert verdict(["好的", "那我们明天见吧"]) == ("", "")          # only the reply counts
    assert verdict(["今天去哪儿玩？", "好的！"], quality={"generic_replies": []}) == ("", "")
    assert verdict(["今天去哪儿玩？", "走起"], quality={"generic_replies": ["走起"]})[0] == "generic_reply"
    # an entry is cleaned as the text is: 呵呵呵 in the list still matches a reply cleaned to 笑
    assert verdict(["你说呢", "呵呵呵"], quality={"generic_replies": ["呵呵呵"]})[0] == "generic_reply"


@pytest.mark.parametrize("turns, found", [
    (["你好", "加我微信abc_12345，有惊喜"], "contact"),
    (["有问题吗", "我的ＱＱ号是１２３４５６７８"], "contact"),   # full-width: NFKC first
    (["在吗", "VX: 13912345678 咨询"], "contact"),
    (["这个多少钱", "想要的加微信聊"], "ad word: 加微信"),
    (["你那件外套哪里买的", "找的代购，正品"], "ad word: 代购"),
    (["新款上市", "点这里 http://t.cn/abc 下单立减"], "link with a sales cue"),
    (["大家看过来", "好消息！好消息！好消息！全场五折"], "repeated: 好消息!"),
])
def test_ads_and_spam(turns, found):
    reason, detail = verdict(turns)
    assert reason == "ads" and detail.startswith(found), detail


@pytest.mark.parametrize("turns", [
    ["你用微信吗", "用啊，微信聊吧"],                     # talking about WeChat is not an ad
    ["我在淘宝买的", "质量怎么样？"],
    ["看这个 http://example.com/cat", "好可爱的猫"],      # a link without a sales cue
    ["我爱你我爱你我爱你", "我也爱你"],                    # repeated, but 3 characters
    ["哈哈哈！哈哈哈！哈哈哈！", "笑死我了"],               # laughter is not promotion
    ["我的QQ昵称叫小王", "好听"],
])
def test_ads_counter_examples(turns):
    assert verdict(turns) == ("", "")


def test_ads_setting():
    turns = ["这个多少钱", "想要的加微信聊"]
    assert verdict(turns, quality={"ads": False}) == ("", "")
    assert verdict(["这个多少钱", "欢迎光临小店"], quality={"ad_words": ["光临小店"]})[0] == "ads"


def test_not_chinese():
    assert verdict(["How are you doing today?", "Fine, thanks."]) == ("not_chinese", "0.00")
    assert verdict(["123", "456"])[0] == "not_chinese"                  # no words at all
    # a Latin word counts as one word: this is mostly Chinese
    assert verdict(["我的iPhone屏幕碎了", "去Apple Store换一个吧"]) == ("", "")
    assert chinese_share(["我的iPhone屏幕碎了"]) == pytest.approx(6 / 7)   # 6 Han, 1 Latin word
    assert verdict(["How are you doing today?", "Fine, thanks."], quality={"min_chinese_share": None}) == ("", "")
    assert verdict(["我们说English吧", "ok fine sure thing"], quality={"min_chinese_share": 0.9})[0] == "not_chinese"


def test_repeated_turns():
    assert verdict(["你好", "你好"]) == ("repeated_turns", "1 of 1")
    assert verdict(["在吗", "在", "在吗？", "在"])[0] == "repeated_turns"     # A B A B: 2 of 3
    assert verdict(["今天天气真好我们出去走走吧", "今天天气真好我们出去走走啊"])[0] == "repeated_turns"  # bigrams 11/13
    assert verdict(["你好", "你好，好久不见", "是啊，最近忙什么呢", "在准备考试"]) == ("", "")
    assert repeated_turns(["a", "b", "a", "c", "b"]) == 2
    assert verdict(["你好", "你好"], quality={"max_repeated_turns": None}) == ("", "")
    assert verdict(["在吗", "在", "在吗？", "在"], quality={"max_repeated_turns": 1.0}) == ("", "")


def test_length_ratio():
    long_post = "今天下班的时候在地铁站门口看到一只小猫，冻得瑟瑟发抖，我给它买了根火腿肠，它吃完就跟着我走了一路"
    assert verdict([long_post, "哦"]) == ("length_ratio", f"{len(long_post)}:1")
    assert verdict(["？", long_post])[0] == "length_ratio"               # either way round
    assert verdict([long_post, "然后呢？你把它带回家了吗"]) == ("", "")
    assert verdict([long_post, "哦"], quality={"max_length_ratio": None, "generic_replies": []}) == ("", "")
    assert verdict(["只有一个回合的一段长文字"]) == ("", "")          # no reply pair: not checked


def test_quality_rules_counted_in_batches():
    batch = batch_of([
        ["今天去哪儿玩？", "好的！"], ["加我微信abc12345", "好"], ["Hello there", "Hi!"], ["你好", "你好"],
        ["周末一起去爬山吧", "好啊，几点出发？"],
    ])
    out = clean_batch(batch, CFG)
    assert out["drop_reason"] == ["generic_reply", "ads", "not_chinese", "repeated_turns", ""]
    assert out["drop_detail"][0] == "好的！" and out["drop_detail"][4] == ""
    from pipelines.preprocess import as_removed, clean_stats

    table = pa.Table.from_pydict(out)
    assert json.loads(clean_stats(table)["reasons"][0]) == {"generic_reply": 1, "ads": 1, "not_chinese": 1,
                                                           "repeated_turns": 1}
    removed = as_removed(table.filter(pa.compute.not_equal(table.column("drop_reason"), "")))
    assert removed.column("detail").to_pylist()[:2] == ["好的！", "contact: 微信abc12345"]


# -- sensitive words ----------------------------------------------------------------------------------
@pytest.fixture()
def word_file(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text("# a comment\n坏词\nBadWord\n\nre:ignored.*pattern\n", encoding="utf-8")
    return str(path)


def test_sensitive_words_drop(word_file):
    cfg = CleanConfig(sensitive={"words": word_file})
    assert verdict(["你说的是坏词吗", "不是"], sensitive={"words": word_file}) == ("sensitive_word", "坏词")
    # full-width and upper case are the same word
    assert verdict(["ＢＡＤＷＯＲＤ这样写", "哦是吗那怎么办"], sensitive={"words": word_file}) == ("sensitive_word", "BadWord")
    assert verdict(["你说的是好词吗", "不是"], sensitive={"words": word_file}) == ("", "")
    out = clean_batch(batch_of([["你好啊朋友", "我很好呀"]], system="别说坏词"), cfg)
    assert out["drop_reason"] == ["sensitive_word"]                  # the system prompt counts too
    # the words handed over by the caller (as preprocess does) win over the file
    out = clean_batch(batch_of([["你说的是坏词吗", "不是"]]), cfg, words=["别的"])
    assert out["drop_reason"] == [""]


def test_sensitive_words_mask(word_file):
    cfg = CleanConfig(sensitive={"words": word_file, "action": "mask"})
    out = clean_batch(batch_of([["你说的是坏词吗", "ｂａｄｗｏｒｄ也不行"]], system="别说坏词"), cfg)
    assert out["drop_reason"] == [""]
    assert out["turns"] == [["你说的是**吗", "*******也不行"]]           # NFKC made it badword: 7 letters
    assert out["system"] == ["别说**"]
    assert json.loads(out["rule_hits"][0])["sensitive_mask"] == 2
    cfg = CleanConfig(sensitive={"words": word_file, "action": "mask", "mask_char": "□"})
    assert clean_batch(batch_of([["坏词坏词", "好词吗"]]), cfg)["turns"] == [["□□□□", "好词吗"]]


def test_sensitive_words_file_must_exist(tmp_path):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="sensitive word list does not exist"):
        CleanConfig(sensitive={"words": str(tmp_path / "nope.txt")})


def test_quality_and_sensitive_rules_on_ray(ray_cluster, word_file):
    """clean_batch as preprocess runs it: Ray Data workers, the word list handed over."""
    import ray

    from zhchat.wordmatch import WordMatcher

    rows = [dialogue_row(d, "t") for d in (
        ["你说的是坏词吗", "不是"], ["今天去哪儿玩？", "好的"], ["周末一起去爬山吧", "好啊，几点出发？"],
        ["加我微信abc12345", "好的呀"], ["Where are you?", "At home."],
    )]
    ds = ray.data.from_arrow(pa.Table.from_pylist(rows, schema=DIALOGUE_SCHEMA)).repartition(2)
    words = WordMatcher.from_file(word_file).words
    out = ds.map_batches(clean_batch, fn_kwargs={"cfg": CleanConfig(), "words": words}, batch_format="pyarrow")
    got = {r["id"]: (r["drop_reason"], r["drop_detail"]) for r in out.take_all()}
    assert [got[r["id"]] for r in rows] == [
        ("sensitive_word", "坏词"), ("generic_reply", "好的"), ("", ""), ("ads", "contact: 微信abc12345"),
        ("not_chinese", "0.00")]
