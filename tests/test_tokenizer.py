"""The trained tokenizer: exact round trip, word vocabulary, loads with no project code."""

from __future__ import annotations

import json
import subprocess
import sys

import jieba
import pytest

from conftest import SAMPLE_TEXTS
from pipelines.tokenizer_train import build_tokenizer, save_tokenizer, to_transformers, train_bpe
from zhchat.config import PreprocessConfig
from zhchat.dialogue import SPECIAL_TOKENS, DialogueFormat

jieba.setLogLevel(60)

ADVERSARIAL = [
    "", " ", "   ", "  前后空格  ", "a  b   c", "\x00\x1f\t\r\n", "\r\n\r\n", "\x7f\x85\u2028\u2029",
    "<|end|>", "<|user|>hi", " <|end|> x <|endoftext|>", "<|assistant|><|system|>", "<|end", "|>", "<||>",
    "👨‍👩‍👧‍👦", "👍🏽", "🇨🇳", "a\u200db\u200c\u200bc", "\ufeffBOM", "\u00a0nbsp\u3000全角空格",
    "𠀀𪚥𰻞", "مرحبا بالعالم", "안녕하세요 세계", "こんにちは世界、カタカナ", "Ελληνικά русский",
    "e\u0301 combining", "Hello 世界 123 😀 𠀀 ok", "ｆｕｌｌｗｉｄｔｈ１２３", "￥100，「引号」《书名》",
    "你好" * 3000, "a" * 10000, " \t " * 500,
]


@pytest.fixture(scope="module")
def tokenizer():
    texts = SAMPLE_TEXTS * 30 + ["我们一起去北京看天安门", "北京欢迎你", "我们是好朋友"] * 30
    batches = ([w for w in jieba.lcut(t)] for t in texts)
    return to_transformers(train_bpe(batches, vocab_size=800, min_frequency=2, show_progress=False), 64)


@pytest.mark.parametrize("s", ADVERSARIAL, ids=lambda s: repr(s[:12]))
def test_round_trip_is_exact(tokenizer, s):
    ids = tokenizer.encode(s, add_special_tokens=True)
    assert tokenizer.decode(ids) == s
    assert tokenizer.unk_token_id is None or tokenizer.unk_token_id not in ids


def test_round_trip_through_dialogue_format(tokenizer):
    """Content is always text: strings that look like special tokens stay characters."""
    fmt = DialogueFormat(tokenizer, context_length=64)
    specials = {tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    for s in ADVERSARIAL:
        ids = fmt.encode_text(s)
        assert not specials & set(ids), s
        assert fmt.decode(ids) == s


def test_special_tokens_and_ids(tokenizer):
    assert tokenizer.convert_ids_to_tokens(list(range(len(SPECIAL_TOKENS)))) == SPECIAL_TOKENS
    assert tokenizer.eos_token == tokenizer.bos_token == tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.model_max_length == 64
    # Typed by a user into raw encode, "<|user|>" is the special token (one id) ...
    assert tokenizer.encode("<|user|>") == [tokenizer.convert_tokens_to_ids("<|user|>")]


def test_vocabulary_has_chinese_words_and_no_cross_word_merges(tokenizer):
    decoded = {tokenizer.convert_tokens_to_string([t]) for t in tokenizer.get_vocab()}
    for word in ("我们", "北京", "天气", "电影", "吃火锅", "天安门"):  # jieba's words in the text
        assert word in decoded, word
    # Merges are learned inside jieba words only: "们一" never occurs inside a word.
    assert "们一" not in decoded and "去北京" not in decoded
    assert len(tokenizer.tokenize("我们一起去北京看天安门")) == 6  # = jieba's six words


def test_empty_training_data_is_a_clear_error():
    with pytest.raises(ValueError, match="train split is empty"):
        train_bpe(iter([]), vocab_size=400, show_progress=False)


def test_autotokenizer_loads_without_project_code(tokenizer, tmp_path):
    save_tokenizer(tokenizer, str(tmp_path))
    s = "  你好，<|end|> 𪚥 👨‍👩‍👧 \x00 "
    code = (
        "import json, sys\n"
        "from transformers import AutoTokenizer\n"
        f"t = AutoTokenizer.from_pretrained({str(tmp_path)!r})\n"
        f"s = {s!r}\n"
        "ids = t.encode(s)\n"
        "print(json.dumps([t.decode(ids) == s, t.eos_token, t.pad_token, t.model_max_length, len(t),"
        " 'zhchat' in sys.modules or 'pipelines' in sys.modules]))\n"
    )
    # A fresh interpreter in an empty folder, so nothing of the project can be imported by accident.
    r = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}, timeout=120)
    assert r.returncode == 0, r.stderr
    same, eos, pad, max_len, n, project_loaded = json.loads(r.stdout.strip().splitlines()[-1])
    assert same and eos == pad == "<|endoftext|>" and max_len == 64 and n == len(tokenizer)
    assert not project_loaded


def test_pretrained_path_is_used_instead_of_training(tokenizer, tmp_path):
    save_tokenizer(tokenizer, str(tmp_path / "tok"))
    cfg = PreprocessConfig(tokenizer={"pretrained": str(tmp_path / "tok")}, format={"context_length": 32})
    tok = build_tokenizer(cfg, word_batches=None)
    assert tok.get_vocab() == tokenizer.get_vocab()
    assert tok.model_max_length == 32
    s = " 你好 <|end|> 😀 "
    assert tok.decode(tok.encode(s)) == s


def test_pretrained_without_dialogue_tokens_gets_them(tmp_path):
    """A GPT-2-like tokenizer with only <|endoftext|>: load_tokenizer adds the rest."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(SAMPLE_TEXTS * 5, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    # clean_up_tokenization_spaces=True as old GPT-2 configs have; it must not survive loading.
    PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|endoftext|>",
                            clean_up_tokenization_spaces=True).save_pretrained(str(tmp_path))
    tok = build_tokenizer(PreprocessConfig(tokenizer={"pretrained": str(tmp_path)}), word_batches=None)
    DialogueFormat(tok, 64)  # raises if a dialogue token is missing
    s = "a , b . c ' d"
    assert tok.decode(tok.encode(s)) == s


def test_bad_pretrained_path_is_a_clear_error(tmp_path):
    cfg = PreprocessConfig(tokenizer={"pretrained": str(tmp_path / "nope")})
    with pytest.raises((FileNotFoundError, OSError, ValueError)):
        build_tokenizer(cfg, word_batches=None)
