"""Token shards: laid out by DialogueFormat only, single-turn text packed, counts right."""

from __future__ import annotations

from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from conftest import SAMPLE_TEXTS, make_dialogues
from pipelines.encode import TOKENS_SCHEMA, encode_rows, encode_splits, tokens_per_char
from zhchat.config import FormatConfig
from zhchat.dialogue import IGNORE_INDEX, DialogueFormat, messages_from_turns

CTX = 48


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def fmt(tok):
    return DialogueFormat(tok, CTX)


def expected(rows: list[tuple[list[str], str]], fmt: DialogueFormat) -> list[tuple[tuple, tuple]]:
    seqs, texts = [], []
    for turns, system in rows:
        if len(turns) == 1 and not system:
            texts.append(turns[0])
        elif turns:
            ids, labels = fmt.encode_dialogue(messages_from_turns(turns, system or None))
            seqs.append((tuple(ids), tuple(labels)))
    seqs += [(tuple(i), tuple(l)) for i, l in fmt.pack_texts(texts)]
    return seqs


def test_dialogue_rows_match_dialogue_format(fmt):
    rows = [(["你好", "你好，今天天气怎么样？"], ""), (["好啊", "几点出发？", "下午三点吧。"], "你是助手")]
    t = encode_rows([r[0] for r in rows], [r[1] for r in rows], fmt)
    assert t.schema == TOKENS_SCHEMA
    got = list(zip(map(tuple, t.column("input_ids").to_pylist()), map(tuple, t.column("labels").to_pylist())))
    assert got == expected(rows, fmt)
    ids, labels = got[1]
    assert ids[1] == fmt.role_ids["system"]
    # Loss only on the assistant replies and their <|end|>.
    assert labels[-1] == fmt.end_id and labels[0] == IGNORE_INDEX


def test_single_turn_rows_are_packed_into_full_blocks(fmt):
    texts = SAMPLE_TEXTS * 6
    t = encode_rows([[x] for x in texts], [""] * len(texts), fmt)
    ids, labels = t.column("input_ids").to_pylist(), t.column("labels").to_pylist()
    stream = [i for x in texts for i in fmt.encode_text(x) + [fmt.eos_id]]
    assert len(ids) == len(stream) // CTX > 1
    assert all(len(b) == CTX for b in ids)
    assert labels == ids  # loss on every token of plain text
    assert [i for b in ids for i in b] == stream[: len(ids) * CTX]


def test_empty_and_missing_turns_are_skipped(fmt):
    t = encode_rows([[], None, ["", "好", "你好"]], ["", "", ""], fmt)
    assert t.column("input_ids").to_pylist() == [fmt.encode_dialogue(messages_from_turns(["好", "你好"]))[0]]


def _write_split(path, rows):
    path.mkdir(parents=True)
    pq.write_table(pa.table({
        "id": [str(i) for i in range(len(rows))],
        "turns": pa.array([r[0] for r in rows], pa.list_(pa.string())),
        "system": [r[1] for r in rows],
        "words": pa.array([[list(t) for t in r[0]] for r in rows], pa.list_(pa.list_(pa.string()))),
    }), path / "part-0.parquet")


def test_encode_splits_on_ray(ray_cluster, tmp_path, tok, fmt):
    dialogues = [(d, "") for d in make_dialogues(60, seed=1)] + [(["我们一起学习中文吧！"], "")] * 40
    dialogues += [(["你好", "谢谢你提醒我。"], "你是一个友好的助手")]
    val = [(d, "") for d in make_dialogues(10, seed=2)]
    _write_split(tmp_path / "seg" / "train", dialogues)
    _write_split(tmp_path / "seg" / "validation", val)
    # no test split at all: counted as empty, not an error
    counts = encode_splits(str(tmp_path / "seg"), str(tmp_path / "tokens"), tok, FormatConfig(context_length=CTX))

    for split, rows in (("train", dialogues), ("validation", val)):
        files = sorted((tmp_path / "tokens" / split).glob("*.parquet"))
        t = pa.concat_tables([pq.read_table(f) for f in files])
        assert t.schema.field("input_ids").type == pa.list_(pa.int32())
        assert t.schema.field("labels").type == pa.list_(pa.int32())
        ids, labels = t.column("input_ids").to_pylist(), t.column("labels").to_pylist()
        assert all(len(i) == len(l) <= CTX for i, l in zip(ids, labels))
        want = expected(rows, fmt)
        assert Counter(zip(map(tuple, ids), map(tuple, labels))) == Counter(want)
        c = counts[split]
        assert c["dialogues"] == len(rows)
        assert c["sequences"] == len(want)
        assert c["tokens"] == sum(len(i) for i, _ in want)
        assert c["loss_tokens"] == sum(x != IGNORE_INDEX for _, l in want for x in l)
    assert set(counts["test"].values()) == {0}

    # tokens/char is counted on the validation split only (the one asked for).
    chars = sum(len(x) for turns, _ in val for x in turns)
    assert counts["validation"]["chars"] == chars and counts["train"]["chars"] == 0
    assert counts["validation"]["text_tokens"] == sum(len(fmt.encode_text(x)) for turns, _ in val for x in turns)
    assert tokens_per_char(counts["validation"]) == round(counts["validation"]["text_tokens"] / chars, 4)


def test_rerun_of_a_batch_overwrites_its_shard(ray_cluster, tmp_path, tok):
    """Shard names are content hashes: encoding the same input twice leaves one copy."""
    rows = [(d, "") for d in make_dialogues(20, seed=4)]
    _write_split(tmp_path / "seg" / "train", rows)
    for _ in range(2):
        counts = encode_splits(str(tmp_path / "seg"), str(tmp_path / "tokens"), tok, FormatConfig(context_length=CTX),
                               measure_split=None)
    t = pq.read_table(tmp_path / "tokens" / "train")
    assert t.num_rows == counts["train"]["sequences"] == 20
