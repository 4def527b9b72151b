"""Ingest readers, chunking and format detection on small files written here (no Ray)."""

from __future__ import annotations

import gzip
import json

import pytest

from pipelines.ingest import plan_inputs
from pipelines.ingest.chunks import list_files, read_chunk, split_file
from pipelines.ingest.detect import detect
from pipelines.ingest.readers import openai_record, sharegpt_record, turns_from_messages, utterances


def write(path, data: bytes | str, gz: bool = False):
    if isinstance(data, str):
        data = data.encode("utf-8")
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def ingest_file(path, fmt: str = "auto", chunk_bytes: int = 1 << 20):
    """Every result of reading one file the way the stage does, chunk by chunk."""
    chunks, info = plan_inputs([str(path)], fmt, chunk_bytes)
    results = [r for c in chunks for r in read_chunk(c)]
    return results, next(iter(info.values())), chunks


def kept(results):
    return [r[1]["turns"] for r in results if r[0] == "ok"]


def bad(results):
    return [(r[1]["line"], r[1]["reason"]) for r in results if r[0] == "bad"]


def skipped(results):
    return [r[1] for r in results if r[0] == "skip"]


# ---- LCCC --------------------------------------------------------------------------------

LCCC_DOC = {"train": [["你 好", " 你 好 啊 "], ["a", 3], "not a dialogue", ["", "x", "y", ""]],
            "valid": [["b", "c", "d"]], "test": 5}


@pytest.mark.parametrize("gz", [False, True])
def test_lccc_json_splits_shapes_and_record_numbers(tmp_path, gz):
    p = write(tmp_path / "lccc.json", json.dumps(LCCC_DOC, ensure_ascii=False, indent=2), gz)
    res, info, _ = ingest_file(p, "lccc")
    # Spaces inside utterances are kept (preprocess un-spaces); ends are stripped, empty ends dropped.
    assert kept(res) == [["你 好", "你 好 啊"], ["x", "y"], ["b", "c", "d"]]
    reasons = bad(res)
    assert [line for line, _ in reasons] == [2, 3, 6]
    assert "utterance 2 is int" in reasons[0][1] and "train[1]" in reasons[0][1] and "record number" in reasons[0][1]
    assert "got str" in reasons[1][1]
    assert "'test' holds int" in reasons[2][1]
    assert ingest_file(p)[1]["format"] == "lccc"


def test_lccc_json_top_level_list_and_invalid_utf8_inside_a_record(tmp_path):
    data = b'[["ok one", "ok two"],\n ["\xff\xfebroken", "x"],\n ["after", "bad bytes"]]'
    res, info, _ = ingest_file(write(tmp_path / "d.json", data))
    assert info["format"] == "lccc"
    assert kept(res) == [["ok one", "ok two"], ["after", "bad bytes"]]
    assert bad(res)[0][0] == 2 and "invalid UTF-8" in bad(res)[0][1]


def test_lccc_json_broken_midway_keeps_records_before(tmp_path):
    res, _, _ = ingest_file(write(tmp_path / "d.json", '{"train": [["a", "b"], ["c", "d"], ["e", '), "lccc")
    assert kept(res) == [["a", "b"], ["c", "d"]]
    (line, reason), = bad(res)
    assert line == 3 and "invalid JSON after record 2" in reason and "rest of the file" in reason


@pytest.mark.parametrize("gz", [False, True])
def test_lccc_jsonl_bad_lines_utf8_crlf_bom(tmp_path, gz):
    data = ("\ufeff" + '["你好","嗨"]\r\n[1,2]\r\nnot json\r\n\r\n{"a": 1}\r\n').encode() + \
        b'["\xff\xfe", "x"]\r\n["a","b"]\r\n["", "", " "]'
    res, info, _ = ingest_file(write(tmp_path / "lccc.jsonl", data, gz))
    assert info["format"] == "lccc_jsonl"
    assert kept(res) == [["你好", "嗨"], ["a", "b"]]
    lines = dict(bad(res))
    assert set(lines) == {2, 3, 5, 6, 8}
    assert "utterance 1 is int" in lines[2]
    assert lines[3].startswith("invalid JSON")
    assert "expected a JSON array" in lines[5]
    assert "invalid UTF-8" in lines[6]
    assert "no non-empty utterance" in lines[8]
    assert skipped(res) == ["blank line"]
    rec = next(r[1]["record"] for r in res if r[0] == "bad" and r[1]["line"] == 6)
    assert "\\xff" in rec  # the raw bytes are shown, escaped


def test_lccc_tsv_interior_empty_is_quarantined_not_dropped(tmp_path):
    p = write(tmp_path / "d.tsv", "a\tb\tc\r\n x \t y \t\n a\t\tc\n")
    res, info, _ = ingest_file(p)
    assert info["format"] == "lccc_tsv"
    assert kept(res) == [["a", "b", "c"], ["x", "y"]]
    assert bad(res)[0][0] == 3 and "break speaker alternation" in bad(res)[0][1]


# ---- STC ---------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["json", "jsonl", "tsv"])
def test_stc_pairs_in_every_layout(tmp_path, layout):
    pairs = [["帖子", "回复"], ["only post"], ["p", "r", "extra"], ["p2", " "]]
    if layout == "json":
        text = json.dumps({"train": pairs}, ensure_ascii=False)
    elif layout == "jsonl":
        text = "\n".join(json.dumps(p, ensure_ascii=False) for p in pairs)
    else:
        text = "\n".join("\t".join(p) for p in pairs)
    p = write(tmp_path / f"STC_train.{layout}", text)
    res, info, _ = ingest_file(p)
    assert (info["format"], info["layout"]) == ("stc", layout)
    assert kept(res) == [["帖子", "回复"]]
    reasons = [r for _, r in bad(res)]
    assert len(reasons) == 3
    assert "got 1 utterances" in reasons[0] and "got 3 utterances" in reasons[1] and "empty response" in reasons[2]
    assert ingest_file(p, "stc")[1]["layout"] == layout


# ---- Douban ------------------------------------------------------------------------------

@pytest.mark.parametrize("gz", [False, True])
def test_douban_label_zero_is_skipped_and_counted(tmp_path, gz):
    text = "1\t你 好\t嗨\t在 吗\n0\t你 好\t嗨\t滚\n0\t你 好\t嗨\t走\n2\tx\ty\n1\tonly\n"
    res, info, _ = ingest_file(write(tmp_path / "douban_train.txt", text, gz))
    assert info["format"] == "douban"
    assert kept(res) == [["你 好", "嗨", "在 吗"]]
    assert skipped(res) == ["label 0 (wrong reply)"] * 2
    assert [line for line, _ in bad(res)] == [4, 5]
    assert "label must be 0 or 1" in bad(res)[0][1] and "needs a label, a context" in bad(res)[1][1]


# ---- GPT2-chitchat -----------------------------------------------------------------------

@pytest.mark.parametrize("eol", ["\n", "\r\n"])
def test_chitchat_blank_line_separated_dialogues(tmp_path, eol):
    text = eol.join(["你好", "嗨", "", "在吗", "在", "干嘛呢", "", "", "最后", "一个", ""])
    res, info, _ = ingest_file(write(tmp_path / "train.txt", text))
    assert info["format"] == "chitchat"
    assert kept(res) == [["你好", "嗨"], ["在吗", "在", "干嘛呢"], ["最后", "一个"]]
    assert not bad(res)


def test_chitchat_invalid_utf8_quarantines_only_its_dialogue(tmp_path):
    data = "a\nb\n\nc\n".encode() + b"\xc3\x28\n" + "d\n\ne\nf\n".encode()
    res, _, _ = ingest_file(write(tmp_path / "chat.txt", data), "chitchat")
    assert kept(res) == [["a", "b"], ["e", "f"]]
    (line, reason), = bad(res)
    assert line == 5 and "invalid UTF-8" in reason and "starting at line 4" in reason


def test_chitchat_gzip(tmp_path):
    res, info, _ = ingest_file(write(tmp_path / "train.txt", "你好\n嗨\n\n在吗\n在\n", gz=True), "chitchat")
    assert kept(res) == [["你好", "嗨"], ["在吗", "在"]]


# ---- ShareGPT / OpenAI -------------------------------------------------------------------

def test_sharegpt_merges_roles_drops_trailing_user_and_keeps_system():
    rec = {"system": "你是助手", "conversations": [
        {"from": "system", "value": "be brief"},
        {"from": "human", "value": "你好"}, {"from": "human", "value": " 在吗 "},
        {"from": "gpt", "value": "在"}, {"from": "gpt", "value": ""},
        {"from": "human", "value": "再见"}]}
    assert sharegpt_record(rec) == ("ok", (["你好\n在吗", "在"], "你是助手\nbe brief"))
    assert sharegpt_record({"conversations": [{"from": "human", "value": "x"}]})[1] == "no assistant reply in the dialogue"
    assert "unsupported role 'observation'" in sharegpt_record(
        {"conversations": [{"from": "observation", "value": "x"}]})[1]
    assert "'value' is int" in sharegpt_record({"conversations": [{"from": "gpt", "value": 3}]})[1]
    assert sharegpt_record({"conversation": []})[1] == "'conversations' is missing"
    assert "system message after" in turns_from_messages([("user", "a"), ("system", "s"), ("assistant", "b")])[1]


def test_openai_records():
    rec = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": [{"type": "text", "text": "a"}]},
                        {"role": "assistant", "content": "b"}, {"role": "assistant", "content": "c"}]}
    assert openai_record(rec) == ("ok", (["a", "b\nc"], "s"))
    assert "unsupported role 'tool'" in openai_record({"messages": [{"role": "tool", "content": "x"}]})[1]
    assert "tool calls" in openai_record({"messages": [{"role": "assistant", "content": None, "tool_calls": [{}]}]})[1]
    assert openai_record([1])[1].startswith("expected a JSON object")


@pytest.mark.parametrize("gz", [False, True])
def test_sharegpt_json_list_and_jsonl(tmp_path, gz):
    recs = [{"conversations": [{"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"}]},
            {"conversations": [{"from": "gpt", "value": "hello"}, {"from": "human", "value": "q2"}, {"from": "gpt", "value": "a2"}]},
            {"conversations": "nope"}]
    res, info, _ = ingest_file(write(tmp_path / "sg.json", json.dumps(recs, indent=2), gz))
    assert (info["format"], info["layout"]) == ("sharegpt", "json")
    assert kept(res) == [["q1", "a1"], ["hello", "q2", "a2"]]
    assert bad(res)[0][0] == 3 and "'conversations' is str" in bad(res)[0][1]
    lines = "\n".join(json.dumps(r) for r in recs) + "\n{broken"
    res, info, _ = ingest_file(write(tmp_path / "sg.jsonl", lines, gz))
    assert (info["format"], info["layout"]) == ("sharegpt", "jsonl")
    assert kept(res) == [["q1", "a1"], ["hello", "q2", "a2"]]
    assert [line for line, _ in bad(res)] == [3, 4]


@pytest.mark.parametrize("gz", [False, True])
def test_openai_jsonl_file(tmp_path, gz):
    lines = [json.dumps({"messages": [{"role": "user", "content": "问"}, {"role": "assistant", "content": "答"}]}, ensure_ascii=False),
             json.dumps({"messages": [{"role": "user", "content": "只有问题"}]}, ensure_ascii=False),
             '{"messages": [}']
    res, info, _ = ingest_file(write(tmp_path / "chat.jsonl", "\r\n".join(lines), gz))
    assert info["format"] == "openai"
    assert kept(res) == [["问", "答"]]
    assert [line for line, _ in bad(res)] == [2, 3]


# ---- plain text --------------------------------------------------------------------------

@pytest.mark.parametrize("gz", [False, True])
def test_text_lines_and_text_file(tmp_path, gz):
    res, info, _ = ingest_file(write(tmp_path / "news.txt", "第一条新闻。\r\n\r\n  第二条 新闻 \n", gz), "text_lines")
    assert kept(res) == [["第一条新闻。"], ["第二条 新闻"]] and skipped(res) == ["blank line"]
    res, info, _ = ingest_file(write(tmp_path / "doc.txt", "\n 标题\n\n正文第一段。\n正文第二段。\n", gz), "text_file")
    assert kept(res) == [["标题\n\n正文第一段。\n正文第二段。"]]


def test_text_file_invalid_utf8_reports_its_line(tmp_path):
    res, _, _ = ingest_file(write(tmp_path / "doc.txt", b"ok\nok\n\xff bad\n"), "text_file")
    (line, reason), = bad(res)
    assert line == 3 and "invalid UTF-8" in reason


# ---- gzip that breaks off, unknown formats -----------------------------------------------

def test_truncated_gzip_keeps_what_was_read_and_says_where(tmp_path):
    data = gzip.compress("".join(f'["u{i}", "r{i}"]\n' for i in range(5000)).encode())
    p = tmp_path / "cut.jsonl.gz"
    p.write_bytes(data[: len(data) // 2])
    res, info, _ = ingest_file(p, "lccc_jsonl")
    assert 0 < len(kept(res)) < 5000
    (line, reason), = bad(res)
    assert line == len(kept(res)) + 1 and "could not be read" in reason


def test_truncated_gzip_json_document(tmp_path):
    data = gzip.compress(json.dumps({"train": [[f"u{i}", f"r{i}"] for i in range(5000)]}).encode())
    p = tmp_path / "cut.json.gz"
    p.write_bytes(data[: len(data) // 2])
    res, info, _ = ingest_file(p)
    assert info["format"] == "lccc" and 0 < len(kept(res)) < 5000
    (line, reason), = bad(res)
    assert line == len(kept(res)) + 1 and "could not be read" in reason


def test_undetectable_file_is_quarantined_with_reason(tmp_path):
    res, info, _ = ingest_file(write(tmp_path / "blob.bin", b"\x00\x01\x02binary"))
    assert info["format"] is None
    (line, reason), = bad(res)
    assert "could not detect the format" in reason and "binary" in reason


# ---- chunking ----------------------------------------------------------------------------

@pytest.mark.parametrize("eol", ["\n", "\r\n"])
def test_line_chunks_keep_true_line_numbers(tmp_path, eol):
    lines = [json.dumps([f"u{i}", f"r{i}"]) if i % 7 else "broken" for i in range(1, 2001)]
    p = write(tmp_path / "big.jsonl", eol.join(lines) + eol)
    res, _, chunks = ingest_file(p, "lccc_jsonl", chunk_bytes=997)
    assert len(chunks) > 20
    assert [c["first_line"] for c in chunks] == sorted({c["first_line"] for c in chunks})
    assert len(kept(res)) == 2000 - 2000 // 7
    assert [line for line, _ in bad(res)] == list(range(7, 2001, 7))
    assert kept(res)[0] == ["u1", "r1"] and kept(res)[-1] == ["u2000", "r2000"]


@pytest.mark.parametrize("eol", ["\n", "\r\n"])
def test_block_chunks_never_split_a_dialogue(tmp_path, eol):
    dialogues = [[f"d{i}u{j}" for j in range(1 + i % 4)] for i in range(600)]
    text = (eol + eol).join(eol.join(d) for d in dialogues) + eol
    p = write(tmp_path / "train.txt", text)
    chunks = split_file(str(p), "chitchat", "blocks", 501, False, piece_bytes=256)
    assert len(chunks) > 10
    res = [r for c in chunks for r in read_chunk(c)]
    assert kept(res) == dialogues


# ---- detection ---------------------------------------------------------------------------

@pytest.mark.parametrize("name,content,expected", [
    ("x.json", json.dumps({"train": [["a", "b"]], "valid": []}, indent=2), ("lccc", "json")),
    ("x.json", '{"train": [["a", "b"]]}', ("lccc", "json")),
    ("x.json", '[["a", "b"], ["c", "d"]]', ("lccc", "json")),
    ("STC.json", json.dumps({"train": [["a", "b"]]}, indent=1), ("stc", "json")),
    ("x.jsonl", '["a", "b"]\n["c"]\n', ("lccc_jsonl", "jsonl")),
    ("x.jsonl", '{broken\n["a", "b"]\n', ("lccc_jsonl", "jsonl")),
    ("stc_test.jsonl", '["a", "b"]\n', ("stc", "jsonl")),
    ("x.txt", "a\tb\tc\nd\te\n", ("lccc_tsv", "tsv")),
    ("x.txt", "1\ta\tb\n0\ta\tc\n", ("douban", "tsv")),
    ("train.txt", "你好\n嗨\n\n在吗\n在\n干嘛\n", ("chitchat", "blocks")),
    ("x.txt", "你好\r\n嗨\r\n\r\n在吗\r\n在\r\n", ("chitchat", "blocks")),
    ("x.json", json.dumps([{"conversations": [{"from": "human", "value": "a"}]}], indent=2), ("sharegpt", "json")),
    ("x.jsonl", json.dumps({"conversations": []}) + "\n", ("sharegpt", "jsonl")),
    ("x.jsonl", json.dumps({"messages": []}) + "\n", ("openai", "jsonl")),
    ("x.txt", "一行一个文档。\n又一个文档。\n", ("text_lines", "lines")),
    ("x.md", ("很长的段落。" * 40 + "\n\n") * 3, ("text_file", "whole")),
])
def test_detect_each_format(tmp_path, name, content, expected):
    d = detect(name, content.encode("utf-8"), complete=True)
    assert (d.format, d.layout) == expected, d.why
    assert d.why
    # The same through a gzip file and the planner (which decompresses the head).
    p = write(tmp_path / name, content, gz=True)
    _, info, _ = ingest_file(p)
    assert (info["format"], info["layout"], info["chosen"]) == (*expected, "detected")


def test_detect_a_head_cut_mid_document():
    doc = json.dumps({"train": [["你好", "嗨"]] * 10000}, ensure_ascii=False, indent=2).encode()
    assert detect("x.json", doc[:65536]).format == "lccc"
    doc = json.dumps([{"system": "s", "conversations": [{"from": "human", "value": "a"}]}] * 5000, indent=2).encode()
    assert detect("x.json", doc[:65536]).format == "sharegpt"


def test_walk_is_recursive_and_skips_hidden(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / ".git").mkdir()
    for rel in ["a/x.jsonl", "a/b/y.jsonl", "a/.hidden.jsonl", ".git/z.jsonl", "top.txt"]:
        (tmp_path / rel).write_text('["a", "b"]\n')
    found = [p[len(str(tmp_path)) + 1:] for p in list_files([str(tmp_path)])]
    assert found == ["a/b/y.jsonl", "a/x.jsonl", "top.txt"]
    assert list_files([str(tmp_path / "a" / ".hidden.jsonl")])  # named explicitly: read


def test_utterances_rejects_non_strings_and_surrogates():
    assert utterances(["a", None])[1] == "utterance 2 is null, expected a string"
    assert "surrogate" in utterances(["a", "\ud800"])[1]


def test_parse_chunks_plain_function_writes_side_files(tmp_path):
    """The Ray task body, called directly: dialogue tables out, quarantine and counts aside."""
    import pyarrow.parquet as pq

    from pipelines.ingest.stage import parse_chunks

    p = write(tmp_path / "d.jsonl", '["a", "b"]\nbroken\n\n["c", "d"]\n')
    chunks, _ = plan_inputs([str(p)], "lccc_jsonl", 1 << 20)
    side = tmp_path / "side"
    tables = list(parse_chunks(chunks, "unit-000000", str(side), batch_rows=1))
    assert [t.column("turns").to_pylist() for t in tables] == [[["a", "b"]], [["c", "d"]]]
    q = pq.read_table(side / "quarantine" / "unit-000000.parquet").to_pylist()
    assert [(r["line"], r["record"]) for r in q] == [(2, "broken")]
    (stats,) = json.loads((side / "stats" / "unit-000000.json").read_text())
    assert (stats["read"], stats["kept"], stats["skipped"], stats["quarantined"]) == (4, 2, 1, 1)
