"""`zhchat ingest` end to end on the session's local Ray cluster."""

from __future__ import annotations

import gzip
import json
import time
from collections import Counter

import pyarrow.parquet as pq

from zhchat.config import load_config
from zhchat.tables import DIALOGUE_SCHEMA, QUARANTINE_SCHEMA, dialogue_id


def make_inputs(root):
    """A folder with one file per common format, each with some bad or skipped records."""
    (root / "sub").mkdir(parents=True)
    (root / ".cache").mkdir()
    (root / "lccc.jsonl").write_bytes('["你 好", "你 好 啊"]\n[1, 2]\n\n'.encode() + b'["\xff", "x"]\n["a", "b", "c"]\n')
    (root / "douban_test.txt").write_text("1\t在 吗\t在\n0\t在 吗\t不 在\n1\t只有\n", encoding="utf-8")
    (root / "sub" / "chat.txt.gz").write_bytes(gzip.compress("你好\r\n嗨\r\n\r\n在吗\r\n在\r\n".encode()))
    (root / "sub" / "sg.json").write_text(json.dumps([
        {"system": "你是助手", "conversations": [{"from": "human", "value": "你好"}, {"from": "gpt", "value": "你好！"},
                                                   {"from": "human", "value": "再见"}]},
        {"conversations": [{"from": "human", "value": "没人回"}]},
    ], ensure_ascii=False), encoding="utf-8")
    (root / ".cache" / "hidden.jsonl").write_text('["hidden", "file"]\n')
    (root / "notes.bin").write_bytes(b"\x00\x00binary")
    return {
        "kept": {("你 好", "你 好 啊"), ("a", "b", "c"), ("在 吗", "在"), ("你好", "嗨"), ("在吗", "在"), ("你好", "你好！")},
        "read": 5 + 3 + 2 + 2 + 1, "kept_n": 6, "skipped": 2, "quarantined": 5,
    }


def config(inputs, out, **ingest):
    return load_config(overrides={"ingest": {"inputs": inputs, "out": str(out), **ingest}}).resolved()


def check_counts(summary, out):
    """read = kept + skipped + quarantined per file, and the tables hold exactly those rows."""
    dialogues = pq.read_table(out / "dialogues")
    quarantine = pq.read_table(out / "quarantine")
    by_source = Counter(dialogues.column("source").to_pylist())
    by_file = Counter(quarantine.column("file").to_pylist())
    for path, f in summary["files"].items():
        assert f["read"] == f["kept"] + f["skipped"] + f["quarantined"], path
        assert by_source[path] == f["kept"], path
        assert by_file[path] == f["quarantined"], path
    return dialogues, quarantine


def test_ingest_folder_end_to_end_and_rerun_replaces(ray_cluster, tmp_path):
    from pipelines.ingest import run_ingest

    expect = make_inputs(tmp_path / "in")
    out = tmp_path / "out"
    summary = run_ingest(config([str(tmp_path / "in")], out))

    assert json.loads((out / "summary.json").read_text(encoding="utf-8")) == summary
    files = {p.rsplit("/", 1)[-1]: f for p, f in summary["files"].items()}
    assert set(files) == {"lccc.jsonl", "douban_test.txt", "chat.txt.gz", "sg.json", "notes.bin"}  # hidden skipped
    assert {n: f["format"] for n, f in files.items()} == {
        "lccc.jsonl": "lccc_jsonl", "douban_test.txt": "douban", "chat.txt.gz": "chitchat", "sg.json": "sharegpt",
        "notes.bin": None}
    assert all(f["chosen"] == "detected" and f["why"] for f in files.values())
    assert files["douban_test.txt"]["skipped_reasons"] == {"label 0 (wrong reply)": 1}
    assert summary["totals"] == {"read": expect["read"], "kept": expect["kept_n"], "skipped": expect["skipped"],
                                 "quarantined": expect["quarantined"]}

    dialogues, quarantine = check_counts(summary, out)
    assert dialogues.schema.equals(DIALOGUE_SCHEMA, check_metadata=False)
    assert quarantine.schema.equals(QUARANTINE_SCHEMA, check_metadata=False)
    rows = dialogues.to_pylist()
    assert {tuple(r["turns"]) for r in rows} == expect["kept"]
    sg = next(r for r in rows if r["turns"] == ["你好", "你好！"])
    assert sg["system"] == "你是助手" and sg["id"] == dialogue_id(["你好", "你好！"], "你是助手")
    q = {(r["file"].rsplit("/", 1)[-1], r["line"]): r for r in quarantine.to_pylist()}
    assert set(q) == {("lccc.jsonl", 2), ("lccc.jsonl", 4), ("douban_test.txt", 3), ("sg.json", 2), ("notes.bin", 0)}
    assert "invalid UTF-8" in q[("lccc.jsonl", 4)]["reason"] and "\\xff" in q[("lccc.jsonl", 4)]["record"]
    assert "could not detect the format" in q[("notes.bin", 0)]["reason"]
    assert all(r["reason"] for r in q.values())

    # A rerun to the same OUT replaces the tables: same rows, no duplicates.
    again = run_ingest(config([str(tmp_path / "in")], out))
    d2, q2 = check_counts(again, out)
    assert d2.num_rows == dialogues.num_rows and q2.num_rows == quarantine.num_rows
    # ...and with fewer inputs, only those remain.
    only = run_ingest(config([str(tmp_path / "in" / "lccc.jsonl")], out, format="lccc_jsonl"))
    d3, _ = check_counts(only, out)
    assert d3.num_rows == 2 and set(d3.column("source").to_pylist()) == set(only["files"])
    assert only["files"][next(iter(only["files"]))]["chosen"] == "given"


def test_cli_ingest(ray_cluster, tmp_path, capsys):
    from zhchat.cli import main

    make_inputs(tmp_path / "in")
    out = tmp_path / "out"
    assert main(["ingest", str(tmp_path / "in"), "--out", str(out), "--format", "auto"]) == 0
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    check_counts(summary, out)
    err = capsys.readouterr().err
    assert "douban_test.txt" in err and "quarantined" in err and "chitchat" in err
    # No inputs: a clear error, no Ray job.
    assert main(["ingest", "--out", str(out)]) == 1
    assert "no inputs" in capsys.readouterr().err
    # An empty folder: a clear error too.
    (tmp_path / "empty").mkdir()
    assert main(["ingest", str(tmp_path / "empty"), "--out", str(out)]) == 1
    assert "no input files found" in capsys.readouterr().err


def test_all_quarantined_still_writes_readable_tables(ray_cluster, tmp_path):
    from pipelines.ingest import run_ingest

    (tmp_path / "bad.jsonl").write_text("nope\n{}\n", encoding="utf-8")
    summary = run_ingest(config([str(tmp_path / "bad.jsonl")], tmp_path / "out", format="lccc_jsonl"))
    d, q = check_counts(summary, tmp_path / "out")
    assert d.num_rows == 0 and q.num_rows == 2
    assert d.schema.equals(DIALOGUE_SCHEMA, check_metadata=False)


def test_many_small_files_are_packed_into_few_tasks(ray_cluster, tmp_path):
    from pipelines.ingest.chunks import pack_chunks
    from pipelines.ingest import plan_inputs, run_ingest

    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(40):
        (docs / f"{i:03d}.txt").write_text(f"第{i}篇文章。\n\n正文。\n", encoding="utf-8")
    chunks, _ = plan_inputs([str(docs)], "text_file", 1 << 20)
    assert len(chunks) == 40 and len(pack_chunks(chunks, 1 << 20)) == 1
    summary = run_ingest(config([str(docs)], tmp_path / "out", format="text_file"))
    d, _ = check_counts(summary, tmp_path / "out")
    assert d.num_rows == 40 and d.column("turns").to_pylist()[0] == ["第0篇文章。\n\n正文。"]


def test_large_jsonl_is_read_in_several_chunks(ray_cluster, tmp_path):
    """~50 MB of JSON lines, cut into 16 MB chunks that tasks parse in parallel."""
    from pipelines.ingest import run_ingest

    line = json.dumps(["今天天气很好，我们去公园散步吧。" * 3, "好啊，几点出发？" * 3, "下午三点吧。" * 3], ensure_ascii=False)
    n = 50_000_000 // (len(line.encode()) + 1)
    path = tmp_path / "big.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(line if i % 10_000 else "{broken")
            f.write("\n")
    t0 = time.time()
    summary = run_ingest(config([str(path)], tmp_path / "out", chunk_mb=16))
    f = summary["files"][str(path)]
    assert summary["chunks"] >= 3 and f["chunks"] == summary["chunks"]
    assert f["read"] == n and f["quarantined"] == len(range(0, n, 10_000)) and f["kept"] == n - f["quarantined"]
    d, q = check_counts(summary, tmp_path / "out")
    assert len(list((tmp_path / "out" / "dialogues").glob("*.parquet"))) >= 2  # several blocks written
    assert sorted(q.column("line").to_pylist()) == [i + 1 for i in range(0, n, 10_000)]
    print(f"50 MB jsonl: {n} lines in {time.time() - t0:.1f}s")
