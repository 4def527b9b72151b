"""BERT-style tokenizers (BertTokenizerFast: a character vocabulary with [CLS], [SEP], [PAD],
[UNK], [MASK]), as the Chinese GPT-2 checkpoints people fine-tune from ship. A tiny one is
built here from a vocabulary list; nothing is downloaded."""

from __future__ import annotations

import pytest

from conftest import SAMPLE_TEXTS

LATIN = ["hello", "world", "ok", "##s", "12", "##3"]


def build_bert_tokenizer(out_dir: str, texts=SAMPLE_TEXTS, extra=LATIN):
    """A BertTokenizerFast over the characters of `texts` (+ a few Latin words), saved."""
    from transformers import BertTokenizerFast

    chars = sorted({c for t in texts for c in t if not c.isspace() and not c.isascii()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + list(extra)
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)})
    tok.save_pretrained(out_dir)
    return tok


@pytest.fixture
def bert(tmp_path):
    from zhchat.tokenizer import load_tokenizer

    build_bert_tokenizer(str(tmp_path))
    return load_tokenizer(str(tmp_path))


def _ids(tok, text):
    return tok.backend_tokenizer.encode(text, add_special_tokens=False).ids


def test_bert_tokenizer_gets_the_dialogue_tokens(bert):
    from zhchat.dialogue import DialogueFormat, Message
    from zhchat.tokenizer import is_wordpiece

    assert is_wordpiece(bert) and bert.eos_token == "<|endoftext|>"
    fmt = DialogueFormat(bert, 64)  # raises if a dialogue token is missing
    ids = fmt.build_prompt([Message("user", "你好")], 8)
    assert bert.cls_token_id not in ids and bert.sep_token_id not in ids  # no [CLS]/[SEP] inserted


def test_decode_reads_as_chinese(bert):
    """No space between characters, no [SEP]/[CLS]/[UNK] text, Latin words keep their spaces."""
    from zhchat.tokenizer import decode

    ids = _ids(bert, "你好，hello world！今天天气怎么样？")
    assert bert.decode(ids) != "你好，hello world！今天天气怎么样？"  # what the BERT decoder does
    assert decode(bert, ids) == "你好，hello world！今天天气怎么样？"
    wrapped = [bert.cls_token_id] + ids + [bert.sep_token_id, bert.unk_token_id, bert.pad_token_id]
    assert decode(bert, wrapped) == "你好，hello world！今天天气怎么样？"
    assert decode(bert, _ids(bert, "ok 123 hellos")) == "ok 123 hellos"  # ## pieces glue on


def test_decode_of_a_byte_level_tokenizer_is_exact(tiny_tokenizer_dir):
    from zhchat.tokenizer import decode, load_tokenizer

    tok = load_tokenizer(tiny_tokenizer_dir)
    s = "Hello 世界 123 😀 ok"
    assert decode(tok, _ids(tok, s)) == s


def test_tokenizer_report_names_what_the_vocabulary_loses(bert):
    from zhchat.tokenizer import tokenizer_report

    r = tokenizer_report(bert, ["你好", "Hello 鲸鱼", "你好，hello world！"])
    assert r["texts"] == 3
    assert r["round_trip_changed"] == 1  # lower-cased, [UNK] dropped
    assert r["unknown_tokens"] == 2 and 0 < r["unknown_rate"] < 1  # 鲸 and 鱼 are not in the vocabulary
    assert r["examples"][0]["text"] == "Hello 鲸鱼" and "hello" in r["examples"][0]["decoded"]


def test_streamed_reply_reads_as_chinese(bert):
    """The engine's incremental detokenizer, token by token, gives the same normal text."""
    from zhchat.engine.detokenizer import Detokenizer

    ids = _ids(bert, "你好，hello world！今天天气怎么样？")
    d = Detokenizer(bert)
    text = "".join(d.push(i) for i in ids) + d.flush()
    assert text == "你好，hello world！今天天气怎么样？"
