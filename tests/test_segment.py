"""jieba segmentation: Segmenter on plain batches, on Ray Data actors, user dictionaries,
stopwords, and the word cutter giving exactly jieba's words."""

from __future__ import annotations

import os
import random

import numpy as np
import pyarrow as pa
import pytest

from pipelines.segment import Segmenter, load_stopwords, make_tokenizer, plan_actors
from zhchat.config import SegmentConfig
from zhchat.tables import DIALOGUE_SCHEMA, dialogue_row

NEW_WORD = "蓝鲸智聊"   # not in jieba's dictionary


@pytest.fixture(scope="module")
def user_dict(tmp_path_factory):
    path = tmp_path_factory.mktemp("dicts") / "user.txt"
    path.write_text(f"{NEW_WORD} 100 nz\n", encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def plain():
    return Segmenter(SegmentConfig())


def numpy_batch(dialogues):
    """What Ray Data hands a map_batches UDF with batch_format="numpy"."""
    rows = [dialogue_row(d, "t") for d in dialogues]
    batch = {k: np.array([r[k] for r in rows], dtype=object) for k in ("id", "source", "system")}
    batch["turns"] = np.array([np.array(d, dtype=object) for d in dialogues] + [None], dtype=object)[:-1]
    return batch


def test_segmenter_on_a_numpy_batch(plain):
    dialogues = [["我来到北京清华大学", "你好 世界"], ["好的"]]
    out = plain(numpy_batch(dialogues))
    assert out["turns"] == dialogues                           # text unchanged, as plain lists
    assert out["words"] == [[["我", "来到", "北京", "清华大学"], ["你好", " ", "世界"]], [["好", "的"]]]
    assert "words_nostop" not in out
    for d, ws in zip(out["turns"], out["words"]):             # words join back to the text
        assert ["".join(w) for w in ws] == d


def test_user_dictionary_changes_segmentation(plain, user_dict):
    text = f"我在用{NEW_WORD}聊天"
    assert NEW_WORD not in plain.words(text)
    custom = Segmenter(SegmentConfig(user_dicts=[user_dict]))
    assert NEW_WORD in custom.words(text)


def test_stopwords_only_in_words_nostop(user_dict):
    seg = Segmenter({"stopwords": "default"})
    out = seg({"id": ["a"], "turns": [["我的猫是白色的，你的呢？"]]})
    assert out["turns"] == [["我的猫是白色的，你的呢？"]]
    words = out["words"][0][0]
    assert {"我", "的", "是", "你", "呢"} <= set(words)
    assert out["words_nostop"] == [[["猫", "白色"]]]             # stopwords and punctuation gone


def test_stopword_files():
    default = load_stopwords("default")
    assert len(default) >= 300 and {"的", "了", "是", "吗"} <= default
    assert "猫" not in default
    assert load_stopwords(None) == frozenset()
    with pytest.raises(ValueError, match="stopword file"):
        load_stopwords("/no/such/stopwords.txt")


def test_bad_user_dictionary_is_named(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes("蓝鲸 abc\n".encode("gbk") + b"\xff\xfe\n")
    with pytest.raises(ValueError, match="bad.txt"):
        make_tokenizer(SegmentConfig(user_dicts=[str(bad)]))


def test_plan_actors_leaves_room_for_writes():
    assert plan_actors(SegmentConfig(), 2) == (2, 0.5)
    assert plan_actors(SegmentConfig(), 4) == (4, 0.75)
    assert plan_actors(SegmentConfig(actors=1), 4) == (1, 1.0)
    actors, each = plan_actors(SegmentConfig(), 1)
    assert actors == 1 and each < 1


def random_texts(n: int, seed: int = 0) -> list[str]:
    """Dictionary words, characters missing from jieba's HMM tables, Latin, digits, emoji."""
    import jieba

    rng = random.Random(seed)
    with open(os.path.join(os.path.dirname(jieba.__file__), "dict.txt"), encoding="utf-8") as f:
        words = [line.split()[0] for line in f]
    rare = [chr(c) for c in range(0x4E00, 0x9FA6)]
    extras = ["，", "。", "？", " ", "abc", "Hello world", "123", "3.14", "😀", "~~", "<电话>", NEW_WORD]
    texts = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(3, 15)):
            r = rng.random()
            parts.append(rng.choice(words) if r < 0.6 else
                         "".join(rng.choice(rare) for _ in range(rng.randint(1, 4))) if r < 0.8 else
                         rng.choice(extras) if r < 0.85 else rng.choice("的了是我你他吗呢"))
        texts.append("".join(parts))
    return texts


def jieba_reference(user_dict: str, hmm: bool):
    """jieba's own code, untouched: the words the cutter must reproduce."""
    import jieba

    ref = jieba.Tokenizer()
    ref.load_userdict(user_dict)
    return lambda text: ref.lcut(text, HMM=hmm)


@pytest.mark.parametrize("hmm", [True, False])
def test_cutter_identical_to_jieba_on_large_corpus(hmm, user_dict):
    """zhchat's one-pass cutter gives exactly jieba.lcut's words, ties between equal-scoring
    routes (runs of 哈) and the HMM cache's remembered answers included."""
    ref = jieba_reference(user_dict, hmm)
    seg = Segmenter(SegmentConfig(hmm=hmm, user_dicts=[user_dict]))
    assert not seg.tokenizer.use_jieba_code                 # the probe check passed: our code is in use
    texts = random_texts(6000, seed=1 if hmm else 2)       # ~140k characters
    texts += ["", " ", "\t\n", "ａｂｃ１２３", "C++/C#", "3.14%的人", "e-mail: a.b@c.com", NEW_WORD * 3]
    texts += ["哈" * n for n in range(1, 30)] + ["呵呵" * n + "嘿" * n for n in range(1, 12)]
    for t in texts + texts:                                # twice: the HMM cache's answers too
        assert seg.words(t) == ref(t), t


def test_a_cutter_that_differs_falls_back_to_jieba(monkeypatch):
    """If this jieba ever cuts differently from zhchat's restatement, jieba's own code is used."""
    import pipelines.segment as segment

    word_cutter = segment._word_cutter_class()
    monkeypatch.setattr(word_cutter, "route_ends", lambda self, block: list(range(len(block))))  # every char alone
    monkeypatch.setattr(segment, "_word_cutter_class", lambda: word_cutter)
    tok = make_tokenizer(SegmentConfig())
    assert tok.use_jieba_code
    assert tok.lcut("我来到北京清华大学") == ["我", "来到", "北京", "清华大学"]


def test_segment_dataset_on_ray(ray_cluster, user_dict):
    import ray

    from pipelines.segment import segment_dataset

    dialogues = [[f"我在用{NEW_WORD}聊天", "的确是个好东西"], ["你好"]] * 20
    rows = [dialogue_row(d, "t") for d in dialogues]
    ds = ray.data.from_arrow(pa.Table.from_pylist(rows, schema=DIALOGUE_SCHEMA)).repartition(2)
    cfg = SegmentConfig(user_dicts=[user_dict], stopwords="default", actors=1)
    out = segment_dataset(ds, cfg)
    schema = out.schema()
    assert schema.base_schema.field("words").type == pa.list_(pa.list_(pa.string()))
    assert schema.base_schema.field("turns").type == pa.list_(pa.string())
    result = {r["id"]: r for r in out.take_all()}
    first = result[rows[0]["id"]]
    assert first["turns"] == dialogues[0]
    assert NEW_WORD in first["words"][0]
    assert "的" not in first["words_nostop"][1] and "的确" in first["words"][1]
    assert segment_dataset(ds, SegmentConfig(enabled=False)) is ds


def test_segmenter_on_a_pyarrow_batch(plain):
    """What preprocess hands it (batch_format="pyarrow"): typed columns, and a second pass
    replaces `words` instead of adding a duplicate column."""
    table = pa.Table.from_pylist([dialogue_row(["你好世界", ""], "t"), dialogue_row(["好"], "t")],
                                 schema=DIALOGUE_SCHEMA)
    out = plain(plain(table))
    assert out.column_names.count("words") == 1
    assert out.schema.field("words").type == pa.list_(pa.list_(pa.string()))
    assert out.column("words").to_pylist() == [[["你好", "世界"], []], [["好"]]]
