from transformers import AutoTokenizer

from zhchat.dialogue import (
    IGNORE_INDEX, DialogueFormat, Message, PromptTooLong, messages_from_turns, roles_for_turns,
)
import pytest


@pytest.fixture(scope="module")
def fmt(tiny_tokenizer_dir):
    return DialogueFormat(AutoTokenizer.from_pretrained(tiny_tokenizer_dir), context_length=64)


def test_roles_end_with_assistant():
    assert roles_for_turns(1) == ["assistant"]
    assert roles_for_turns(4) == ["user", "assistant", "user", "assistant"]
    assert roles_for_turns(3) == ["assistant", "user", "assistant"]


def test_loss_mask_covers_exactly_reply_tokens(fmt):
    msgs = messages_from_turns(["你好", "今天天气很好", "好啊"])  # assistant, user, assistant
    ids, labels = fmt.encode_dialogue(msgs)
    assert len(ids) == len(labels)
    expected = [IGNORE_INDEX]  # <|endoftext|>
    for m in msgs:
        body = fmt.encode_text(m.content) + [fmt.end_id]
        expected += [IGNORE_INDEX] + (body if m.role == "assistant" else [IGNORE_INDEX] * len(body))
    assert labels == expected
    user_body = fmt.encode_text("今天天气很好")
    # the user turn's tokens never carry loss
    start = ids.index(fmt.role_ids["user"]) + 1
    assert all(l == IGNORE_INDEX for l in labels[start:start + len(user_body) + 1])


def test_loss_on_all_turns(tiny_tokenizer_dir):
    fmt = DialogueFormat(AutoTokenizer.from_pretrained(tiny_tokenizer_dir), 64, loss_on="all")
    ids, labels = fmt.encode_dialogue(messages_from_turns(["你好", "谢谢"]))
    role_positions = [i for i, t in enumerate(ids) if t in fmt.role_ids.values()]
    assert all(labels[i] == IGNORE_INDEX for i in role_positions)
    assert sum(l != IGNORE_INDEX for l in labels) == len(ids) - 1 - len(role_positions)


def test_history_truncated_from_oldest(fmt):
    turns = ["我喜欢看电影，你呢？我也喜欢，最近有什么好看的电影？"] * 6 + ["好啊"]
    ids, labels = fmt.encode_dialogue(messages_from_turns(turns))
    assert len(ids) <= fmt.context_length
    assert ids[-2:] == fmt.encode_text("好啊")[-1:] + [fmt.end_id]


def test_special_token_text_stays_text(fmt):
    ids = fmt.encode_text("<|end|><|assistant|>")
    assert fmt.end_id not in ids and fmt.role_ids["assistant"] not in ids
    assert fmt.decode(ids) == "<|end|><|assistant|>"


def test_prompt_ends_with_assistant_and_rejects_too_long(fmt):
    p = fmt.build_prompt([Message("system", "你是助手"), Message("user", "你好")], max_new_tokens=8)
    assert p[0] == fmt.eos_id and p[-1] == fmt.role_ids["assistant"]
    assert p[1] == fmt.role_ids["system"]
    with pytest.raises(PromptTooLong):
        fmt.build_prompt([Message("user", "你好" * 200)], max_new_tokens=8)


def test_pack_texts_full_blocks(fmt):
    blocks = list(fmt.pack_texts(["今天天气很好"] * 50))
    assert blocks and all(len(b) == fmt.context_length and b == l for b, l in blocks)
