"""pipelines/turn_metrics.py on hand-made dialogues: turn buckets, self-repetition (same
speaker only, 4+ characters, punctuation ignored), the per-bucket metrics against
evaluate.py's own functions, the PNG, and the report wiring in evaluate.py (no Ray)."""

from __future__ import annotations

import json
import os

import pytest

from pipelines import evaluate as ev
from pipelines import turn_metrics as tm

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def sample(context, reply, reference="好的。"):
    return {"context": list(context), "reply": reply, "reference": reference}


def test_turn_index_counts_the_reply_speakers_turns():
    # reply to one user turn: the speaker's first turn
    assert tm.turn_index(["你好"]) == 1
    # [user, assistant, user] -> the assistant's second turn; [a, u] -> also its second
    assert tm.turn_index(["u1", "a1", "u2"]) == 2 and tm.turn_index(["a1", "u1"]) == 2
    assert tm.turn_index(["u1", "a1", "u2", "a2", "u3"]) == 3
    assert [tm.turn_bucket(i) for i in range(1, 8)] == ["1", "2", "3", "4+", "4+", "4+", "4+"]
    with pytest.raises(ValueError):
        tm.turn_bucket(0)
    # the reply speaker's earlier turns are the context turns at the reply's parity
    assert tm.own_turns(["u1", "a1", "u2", "a2", "u3"]) == ["a1", "a2"]
    assert tm.own_turns(["a1", "u1"]) == ["a1"]
    assert tm.own_turns(["u1"]) == []


def test_a_four_character_phrase_of_the_same_speaker_two_turns_back_counts():
    context = ["你周末做什么了？", "我今天去公园散步了。", "听起来不错。"]   # u, a, u; reply is a's
    assert tm.repeated_phrase("我今天去公园了", context) == "我今天去公园"
    assert tm.self_repetition_rate(["我今天去公园了"], [context]) == 1.0
    # spaces (LCCC's spaced characters) do not hide a repeat
    assert tm.repeated_phrase("我今天去看书", ["u", "我 今 天 去 散 步", "u2"]) == "我今天去"


def test_the_other_speakers_phrase_does_not_count():
    context = ["我今天去公园散步了。", "真好。", "你呢？"]  # the phrase is the user's (context[0], context[2])
    assert tm.repeated_phrase("我今天去公园了", context) is None
    assert tm.self_repetition_rate(["我今天去公园了"], [context]) == 0.0
    # a one-turn context has no earlier turn of the reply's speaker at all
    assert tm.repeated_phrase("我今天去公园", ["我今天去公园"]) is None


def test_a_three_character_repeat_does_not_count_unless_min_n_is_three():
    context = ["u1", "我今天很忙", "u2"]
    assert tm.repeated_phrase("我今天", context) is None          # 3 characters
    assert tm.repeated_phrase("我今天想吃面", context) is None     # shares only 我今天
    assert tm.repeated_phrase("我今天想吃面", context, min_n=3) == "我今天"


def test_punctuation_only_ngrams_are_ignored():
    context = ["u1", "好的！！！！……", "u2"]
    assert tm.repeated_phrase("嗯！！！！……", context) is None
    # punctuation inside a real phrase still counts as part of it
    assert tm.repeated_phrase("对，好的！！", context) == "好的！！"


def _dialogues():
    """Contexts of 1..11 turns: turn indices 1,2,2,3,3,4,4,5,5,6,6."""
    out = []
    for n in range(1, 12):
        context = [f"第{i}句话" for i in range(n)]
        out.append(sample(context, reply=f"回复{n}号" * 2, reference="参考回复"))
    return out


def test_buckets_land_right_and_4_plus_groups_turns_4_5_6():
    m = tm.turn_metrics(_dialogues())
    counts = {b: r["count"] for b, r in m["buckets"].items()}
    assert counts == {"1": 1, "2": 2, "3": 2, "4+": 6}   # 4+ = contexts of 6..11 turns = turns 4, 5, 6
    assert m["all"]["count"] == 11 and list(m["buckets"]) == ["1", "2", "3", "4+"]


def test_bucket_metrics_use_evaluates_functions_on_model_and_reference():
    assert tm.distinct_n is ev.distinct_n and tm.repetition_rate is ev.repetition_rate  # imported, not copied
    s = [sample(["u1", "我今天去公园散步", "u2"], "我今天去公园 玩", reference="好好好好好好"),   # turn 2
         sample(["u1", "a1", "u2"], "今天天气很好", reference="明天见"),                      # turn 2
         sample(["u1"], "哈哈哈", reference="你好")]                                          # turn 1
    m = tm.turn_metrics(s)
    b2 = m["buckets"]["2"]
    assert b2["count"] == 2
    model, ref = b2["model"], b2["reference"]
    assert model["avg_length"] == pytest.approx((7 + 6) / 2)          # whitespace not counted
    assert model["distinct1"] == pytest.approx(ev.distinct_n([list("我今天去公园玩"), list("今天天气很好")], 1))
    assert model["distinct2"] == pytest.approx(ev.distinct_n([list("我今天去公园玩"), list("今天天气很好")], 2))
    assert model["repetition_rate"] == 0.0 and model["self_repetition"] == pytest.approx(0.5)
    # the human baseline on the same samples: 好好好好好好 repeats a 3-gram; neither copies its speaker
    assert ref["repetition_rate"] == pytest.approx(0.5) and ref["self_repetition"] == 0.0
    assert ref["avg_length"] == pytest.approx((6 + 3) / 2)
    assert m["buckets"]["1"]["model"]["repetition_rate"] == 0.0      # 哈哈哈 has one 3-gram
    assert m["buckets"]["3"] == {"count": 0, "model": None, "reference": None}
    assert m["examples"] == [{"turn": "2", "phrase": "我今天去公园", "reply": "我今天去公园 玩",
                              "earlier_turn": "我今天去公园散步"}]
    fields = tm.report_fields(s)
    assert fields["self_repetition"] == pytest.approx(1 / 3) and fields["self_repetition_reference"] == 0.0
    json.dumps(fields)  # goes into eval_report.json as it is
    assert tm.report_fields([])["self_repetition"] == 0.0


def test_plot_is_a_png_and_nothing_is_drawn_without_replies(tmp_path):
    m = tm.turn_metrics(_dialogues() + [sample(["u1", "我今天去公园散步", "u2"], "我今天去公园")])
    png = tm.plot_turn_metrics(m, str(tmp_path / "t.png"), title="r1/checkpoint_step0000001")
    assert png and open(png, "rb").read(8) == PNG_MAGIC and os.path.getsize(png) > 10_000
    assert tm.plot_turn_metrics(tm.turn_metrics([]), str(tmp_path / "none.png")) is None
    assert not (tmp_path / "none.png").exists()
    # a URI destination is drawn locally and uploaded (file:// goes through the same path as s3://)
    dest = f"file://{tmp_path}/remote/{tm.TURN_PNG}"
    assert tm.write_turn_plot(m, dest) == dest
    assert open(tmp_path / "remote" / tm.TURN_PNG, "rb").read(8) == PNG_MAGIC


def test_evaluate_report_carries_by_turn_the_png_and_the_markdown_table(tmp_path):
    """evaluate.py's report part without Ray: the fields, the PNG beside the JSON, the MD table."""
    s = [dict(sample(["u1", "我今天去公园散步", "u2"], "我今天去公园玩"), generated=True),
         dict(sample(["u1"], "你好呀"), generated=True)]
    report = {"model": str(tmp_path), "data": "DATA", "perplexity": 10.0, "unigram_perplexity": 20.0,
              "tokens": 5, **ev.reply_metrics([x["reply"] for x in s], [x["reference"] for x in s]),
              "samples": 2, "skipped_prompt_too_long": 0, "skipped_single_turn": 0, "sampling": {},
              **tm.report_fields(s)}
    path = ev._save_report(str(tmp_path), report, s)
    saved = json.load(open(path, encoding="utf-8"))
    assert saved["by_turn"]["buckets"]["2"]["count"] == 1 and saved["self_repetition"] == pytest.approx(0.5)
    assert saved["turn_metrics_png"] == str(tmp_path / tm.TURN_PNG)
    assert open(tmp_path / tm.TURN_PNG, "rb").read(8) == PNG_MAGIC
    md = open(tmp_path / ev.REPORT_MD, encoding="utf-8").read()
    assert md.index("## By turn") < md.index("## Sample dialogues")
    assert "| 2 | 1 | 7.0 / 3.0 |" in md and "| 4+ | 0 | – |" in md and "![metrics by turn](turn_metrics.png)" in md
    assert "**我今天去公园**" in md and "| self_repetition (model / human) | 0.5 / 0 |" in md
