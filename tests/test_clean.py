"""Cleaning rules one by one (with counter-examples), rule_hits, batches, and dedup on Ray."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest

from pipelines.clean import (
    clean_batch, clean_text, dedup, dedup_key, id_card_valid, luhn_valid, summarize_hits,
)
from zhchat.config import CleanConfig
from zhchat.tables import DIALOGUE_SCHEMA, dialogue_row

CFG = CleanConfig()


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
    cfg = CleanConfig(max_turns=3, min_turns=2, max_turn_chars=10)
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
    out = clean_batch(numpy_batch, CFG)
    assert out["turns"] == expected and all(type(t) is list for t in out["turns"])
    table = pa.Table.from_pydict(plain, schema=DIALOGUE_SCHEMA)
    out = clean_batch(table, CFG)
    assert isinstance(out, pa.Table)
    assert out.schema.field("turns").type == pa.list_(pa.string())
    assert out.column("turns").to_pylist() == expected
    assert out.column("drop_reason").to_pylist() == ["", ""]


def test_system_prompt_is_cleaned_but_not_counted():
    out = clean_batch(batch_of([["你好", "好"]], system="我的电话13812345678"), CFG)
    assert out["system"] == ["我的电话<电话>"]
    assert out["rule_hits"] == ["{}"]


# -- dedup ------------------------------------------------------------------------------------
def test_dedup_key_modes():
    a, b = ["你好！", "今天 天气 好"], ["你好", "今天天气好。"]
    assert dedup_key(a, "exact") != dedup_key(b, "exact")
    assert dedup_key(a, "normalized") == dedup_key(b, "normalized")
    assert dedup_key(["Hello"], "normalized") == dedup_key(["hello!"], "normalized")
    # turn boundaries count
    assert dedup_key(["你好", "好"], "normalized") != dedup_key(["你", "好好"], "normalized")
    with pytest.raises(ValueError, match="dedup mode"):
        dedup_key(a, "fuzzy")


def test_dedup_on_ray(ray_cluster):
    import ray

    rows = [
        dialogue_row(["你好！", "你好呀"], "a"),
        dialogue_row(["你好！", "你好呀"], "b"),     # exact duplicate (same id)
        dialogue_row(["你好", "你好呀。"], "c"),      # duplicate only when normalised
        dialogue_row(["Hi", "HELLO"], "d"),
        dialogue_row(["hi", "hello"], "e"),
        dialogue_row(["别的", "对话"], "f"),
    ]
    table = pa.Table.from_pylist(rows, schema=DIALOGUE_SCHEMA)
    ds = ray.data.from_arrow(table).repartition(3)

    # Ray's default shuffle (hash, SHUFFLE_V2)
    kept, dups = dedup(ds, "exact", num_partitions=4)
    kept_rows = kept.take_all()
    assert len(kept_rows) == 5 and {r["source"] for r in kept_rows} == {"a", "c", "d", "e", "f"}
    assert [r["source"] for r in dups.take_all()] == ["b"]
    assert set(kept.schema().names) == set(DIALOGUE_SCHEMA.names)

    # the sort-based shuffle, chosen through this dataset's own DataContext
    from ray.data.context import ShuffleStrategy

    ds_sorted = ray.data.from_arrow(table).repartition(3)
    assert ds_sorted.context is not ray.data.DataContext.get_current()
    ds_sorted.context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    kept, dups = dedup(ds_sorted, "normalized")
    kept_ids = sorted(r["id"] for r in kept.take_all())
    dup_rows = dups.take_all()
    assert len(kept_ids) == 3 and len(dup_rows) == 3
    by_key = {}
    for r in rows:
        by_key.setdefault(dedup_key(r["turns"], "normalized"), []).append(r["id"])
    assert kept_ids == sorted(min(v) for v in by_key.values())   # the lowest id per key is kept
    for r in dup_rows:
        assert r["duplicate_of"] in kept_ids and r["duplicate_of"] <= r["id"]

    kept, dups = dedup(ds, "none")
    assert kept.count() == 6 and dups.count() == 0


def test_mark_duplicates_block_without_ray():
    from pipelines.clean import KEY, _mark_duplicates

    block = pa.table({KEY: ["k2", "k1", "k2", "k1", "k3"], "id": ["b", "z", "a", "y", "c"],
                      "source": ["s", "s", "s", "s", "s"]})
    out = _mark_duplicates(block).to_pylist()
    assert [(r["id"], r["_dup"], r["duplicate_of"]) for r in out] == [
        ("y", False, ""), ("z", True, "y"), ("a", False, ""), ("b", True, "a"), ("c", False, "")]
