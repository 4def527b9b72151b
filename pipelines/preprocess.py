"""`zhchat preprocess`: clean, dedup, segment, split, train the tokenizer, write token shards.

    INPUT/dialogues/*.parquet  (ingest or crawl output, zhchat.tables.DIALOGUE_SCHEMA)
      -> clean_batch -> removed/cleaning/ (with reason)  pipelines/clean.py
         (text rules, length limits, quality rules, sensitive words; detail = what was found)
      -> dedup       -> removed/duplicates/ (reason "duplicate", detail = id kept)  pipelines/dedup.py
      -> near_dedup  -> removed/near_duplicates/ (reason "near_duplicate" or
                        "generic_reply_cross_context", detail = the id it duplicates)
      -> segment_dataset (jieba words)                  pipelines/segment.py
      -> split_batch -> segmented/{train,validation,test}/*.parquet
      -> tokenizer trained on the train split's words -> tokenizer/ (Hugging Face format)
      -> encode_splits -> tokens/{split}/*.parquet      pipelines/encode.py
      -> manifest.json (inputs' sha256, config, counts) pipelines/manifest.py

Ray Data runs every step; the work itself is plain functions on batches in those modules.
A rerun with the same input files and config finds manifest.json and skips the work.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from zhchat.config import PreprocessConfig, RunConfig
from zhchat.report import kv_table, say, summary_table
from zhchat.tables import DIALOGUE_SCHEMA
from zhchat.tokenizer import tokenizer_report

from .encode import SPLITS, encode_splits, tokens_per_char
from .manifest import (
    MANIFEST, build_manifest, hash_inputs, input_files, is_complete, join, list_parquet, read_manifest,
    write_manifest,
)
from .tokenizer_train import build_tokenizer, save_tokenizer, words_from_batches

# Intermediate results a stage writes instead of holding them in the object store (the
# near-duplicate step's tagged dialogues); removed once the segmented split is written.
SCRATCH = "_scratch"
OUTPUT_PARTS = ("removed", "segmented", "tokenizer", "tokens", MANIFEST, SCRATCH)
REMOVED_SCHEMA = pa.schema([
    ("id", pa.string()), ("source", pa.string()), ("turns", pa.list_(pa.string())), ("system", pa.string()),
    ("reason", pa.string()), ("detail", pa.string()),
])
INTERNAL_COLUMNS = {"drop_reason", "drop_detail", "rule_hits", "split"}
WORDS_BATCH = 4096
SEGMENT_BLOCK_ROWS = 2048


# -- plain functions on batches (pyarrow tables) --------------------------------------------
def clean_stats(batch: pa.Table) -> dict[str, list[str]]:
    """One row per batch: drop reasons and rule hits, as JSON, merged by the driver."""
    from .clean import summarize_hits

    reasons = Counter(r for r in batch.column("drop_reason").to_pylist() if r)
    hits = summarize_hits(batch.column("rule_hits").to_pylist())
    return {"reasons": [json.dumps(reasons)], "hits": [json.dumps(hits)]}


def fill_ids(batch: pa.Table) -> pa.Table:
    """Rows without an id get the content hash ingest would have given them (the split
    is assigned by id, so every row needs one)."""
    from zhchat.tables import dialogue_id

    ids = batch.column("id").to_pylist()
    if all(ids):
        return batch
    turns, systems = batch.column("turns").to_pylist(), batch.column("system").to_pylist()
    fixed = [i or dialogue_id([t for t in (ts or []) if t is not None], s or "") for i, ts, s in zip(ids, turns, systems)]
    return batch.set_column(batch.column_names.index("id"), "id", pa.array(fixed, pa.string()))


def rows_where_dropped(batch: pa.Table, dropped: bool) -> pa.Table:
    mask = pc.not_equal(batch.column("drop_reason"), "")
    return batch.filter(mask if dropped else pc.invert(mask))


def as_removed(batch: pa.Table, reason: str | None = None) -> pa.Table:
    """Removed rows as written to OUT/removed/: the dialogue (after cleaning), why it was
    removed, and a detail (the id of the dialogue it duplicates; what a quality rule found;
    else the cleaning rules that fired)."""
    n = batch.num_rows
    if reason is not None:
        reasons = pa.array([reason] * n, pa.string())
    elif "near_dup_reason" in batch.column_names:
        reasons = batch.column("near_dup_reason")
    else:
        reasons = batch.column("drop_reason")
    if "duplicate_of" in batch.column_names:
        detail = batch.column("duplicate_of")
    elif "rule_hits" in batch.column_names:
        detail = batch.column("rule_hits")
        if "drop_detail" in batch.column_names:
            found = batch.column("drop_detail")
            detail = pc.if_else(pc.not_equal(found, ""), found, detail)
    else:
        detail = pa.array([""] * n, pa.string())
    return pa.table({
        "id": batch.column("id"), "source": batch.column("source"),
        "turns": batch.column("turns").cast(pa.list_(pa.string())), "system": batch.column("system"),
        "reason": reasons, "detail": detail.cast(pa.string()),
    }, schema=REMOVED_SCHEMA)


def split_counts(batch: pa.Table) -> pa.Table:
    vc = pc.value_counts(batch.column("split"))
    return pa.table({"split": vc.field("values"), "dialogues": vc.field("counts")})


def rows_of_split(batch: pa.Table, split: str) -> pa.Table:
    kept = batch.filter(pc.equal(batch.column("split"), split))
    return kept.drop_columns([c for c in kept.column_names if c in INTERNAL_COLUMNS])


def _merge_stats(rows: list[dict]) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    reasons: Counter = Counter()
    hits: dict[str, dict[str, int]] = {}
    for r in rows:
        reasons.update(json.loads(r["reasons"]))
        for rule, v in json.loads(r["hits"]).items():
            h = hits.setdefault(rule, {"turns": 0, "dialogues": 0})
            h["turns"] += int(v.get("turns", 0))
            h["dialogues"] += int(v.get("dialogues", 0))
    return dict(reasons), hits


# -- the stage --------------------------------------------------------------------------------
def run_preprocess(cfg: RunConfig, args: Any = None) -> dict[str, Any]:
    p = cfg.preprocess
    if p.input is None or p.out is None:
        raise ValueError("preprocess.in and preprocess.out must be set (call RunConfig.resolved())")
    out = p.out
    files = input_files(p.input)
    say(f"[bold]preprocess[/bold]: {len(files)} dialogue table(s) in {p.input} -> {out}")
    inputs = hash_inputs(files)
    if not p.force and is_complete(out, inputs, p):
        say(f"preprocess: [yellow]skipped[/yellow] — {out}/{MANIFEST} shows these {len(files)} input file(s) "
            "(same sha256) already processed with this config; set preprocess.force: true to redo")
        summary = _summary(read_manifest(out), out, skipped=True)
        _print_summary(summary)
        return summary

    from zhchat.runtime import init_ray

    init_ray(cfg.ray)
    _clear_outputs(out)
    counts, tok_info = _run(p, files, out)
    manifest = build_manifest(inputs, p, counts, tok_info)
    write_manifest(out, manifest)
    summary = _summary(manifest, out, skipped=False)
    _print_summary(summary)
    return summary


def _run(p: PreprocessConfig, files: list[str], out: str) -> tuple[dict, dict]:
    import ray

    from .clean import clean_batch
    from .dedup import dedup, near_dedup
    from .segment import segment_dataset
    from .split import split_batch

    n_read = _check_inputs(files)
    ds = ray.data.read_parquet(files, columns=list(DIALOGUE_SCHEMA.names))
    say(f"preprocess: read {n_read:,} dialogues; cleaning")

    # The sensitive-word list is read here, once, and handed to the workers with the config.
    words = _sensitive_words(p.clean)
    # Materialised once: its removed rows, kept rows and statistics are three readers of it.
    cleaned = (ds.map_batches(fill_ids, batch_format="pyarrow")
               .map_batches(clean_batch, fn_kwargs={"cfg": p.clean, "words": words}, batch_format="pyarrow")
               .materialize())
    reasons, hits = _merge_stats(cleaned.map_batches(clean_stats, batch_format="pyarrow").take_all())
    removed_dir = join(out, "removed")
    if sum(reasons.values()):
        (cleaned.map_batches(rows_where_dropped, fn_kwargs={"dropped": True}, batch_format="pyarrow")
         .map_batches(as_removed, batch_format="pyarrow").write_parquet(join(removed_dir, "cleaning")))
    kept = cleaned.map_batches(rows_where_dropped, fn_kwargs={"dropped": False}, batch_format="pyarrow")

    say(f"preprocess: dedup ({p.clean.dedup})")
    parts = shuffle_partitions(n_read)
    kept, duplicates = dedup(kept, p.clean.dedup, num_partitions=parts)
    dup_dir = join(removed_dir, "duplicates")
    duplicates.map_batches(as_removed, fn_kwargs={"reason": "duplicate"}, batch_format="pyarrow").write_parquet(dup_dir)
    n_dup = _count_rows(list_parquet(dup_dir))

    nd = p.clean.near_dup
    levels = [name for name, on in (("dialogues", nd.dialogues), ("replies", nd.replies)) if on]
    say(f"preprocess: near-duplicates ({', '.join(levels) or 'off'}; MinHash {nd.num_perm} permutations, "
        f"{nd.bands} bands, {nd.ngram}-grams, Jaccard >= {nd.threshold})")
    near = near_dedup(kept, nd, num_partitions=parts, scratch=join(out, SCRATCH, "near_dup"))
    kept = near.kept
    near_stats = near.stats()
    for level, reason in (("dialogues", "near_duplicate"), ("replies", "generic_reply_cross_context")):
        if near_stats[level].get("removed"):
            reasons[reason] = near_stats[level]["removed"]
    if any(near_stats[level].get("removed") for level in ("dialogues", "replies")):
        near.removed.map_batches(as_removed, batch_format="pyarrow").write_parquet(join(removed_dir, "near_duplicates"))

    say("preprocess: segmenting and splitting")
    # The shuffle leaves one block per partition: cut them so every segmenter actor has work.
    kept = kept.repartition(target_num_rows_per_block=SEGMENT_BLOCK_ROWS)
    seg = segment_dataset(kept, p.segment)
    seg = seg.map_batches(split_batch, fn_kwargs={"cfg": p.split}, batch_format="pyarrow").materialize()
    seg_dir = join(out, "segmented")
    split_rows = dict.fromkeys(SPLITS, 0)
    for row in seg.map_batches(split_counts, batch_format="pyarrow").take_all():
        split_rows[row["split"]] += row["dialogues"]
    for split in SPLITS:
        if split_rows[split]:
            (seg.map_batches(rows_of_split, fn_kwargs={"split": split}, batch_format="pyarrow")
             .write_parquet(join(seg_dir, split)))
    say("preprocess: dialogues per split: " + ", ".join(f"{k} {v:,}" for k, v in split_rows.items()))
    from zhchat.storage import remove

    remove(join(out, SCRATCH))  # seg is materialised: nothing reads the scratch folder again

    tok = build_tokenizer(p, None if p.tokenizer.pretrained else _train_words(join(seg_dir, "train")))
    tok_dir = join(out, "tokenizer")
    tok_sha = save_tokenizer(tok, tok_dir)
    say(f"preprocess: tokenizer ({len(tok):,} tokens, "
        f"{'from ' + p.tokenizer.pretrained if p.tokenizer.pretrained else 'trained on the train split'}) -> {tok_dir}")

    # tokens/char is measured on held-out text; on tiny inputs without one, on train.
    measured_on = next((s for s in ("validation", "test", "train") if split_rows.get(s)), "validation")
    say("preprocess: encoding token shards")
    per_split = encode_splits(seg_dir, join(out, "tokens"), tok, p.format, measure_split=measured_on)
    tpc = {"chars": per_split[measured_on]["chars"], "tokens": per_split[measured_on]["text_tokens"],
           "tokens_per_char": tokens_per_char(per_split[measured_on])}
    for c in per_split.values():
        del c["chars"], c["text_tokens"]
    # What the tokenizer cannot represent (a BERT-style vocabulary: [UNK], lower-casing,
    # dropped spaces), on up to 2,000 turns of the same split.
    sample = seg.map_batches(rows_of_split, fn_kwargs={"split": measured_on}, batch_format="pyarrow").take(500)
    tok_report = tokenizer_report(tok, [t for r in sample for t in (r["turns"] or [])][:2000])
    if tok_report["unknown_tokens"] or tok_report["round_trip_changed"]:
        from rich.markup import escape

        say("preprocess: [yellow]the tokenizer loses text[/yellow]: " + escape(
            f"{tok_report['unknown_rate']:.2%} of tokens are unknown; {tok_report['round_trip_changed_rate']:.1%} "
            "of turns decode differently, e.g. "
            + "; ".join(f"{e['text'][:30]!r} -> {e['decoded'][:30]!r}" for e in tok_report["examples"][:2])))
    counts = {
        "read": n_read,
        "removed": reasons,
        "dedup_removed": n_dup,
        "near_dup": near_stats,
        "kept": sum(split_rows.values()),
        "rule_hits": hits,
        "splits": per_split,
    }
    tok_info = {
        "path": tok_dir, "sha256": tok_sha, "vocab_size": len(tok),
        "pretrained": p.tokenizer.pretrained, "measured_on": measured_on, **tpc, "report": tok_report,
    }
    return counts, tok_info


def _sensitive_words(clean) -> list[str] | None:
    """The words of clean.sensitive.words (None when off), read on the driver."""
    if not clean.sensitive.words:
        return None
    from zhchat.wordmatch import WordMatcher

    m = WordMatcher.from_file(clean.sensitive.words)
    say(f"preprocess: {len(m):,} sensitive words from {clean.sensitive.words} ({clean.sensitive.action})")
    return m.words


ROWS_PER_PARTITION = 50_000


def shuffle_partitions(rows: int) -> int:
    """At most ~50k rows per shuffle partition, at least one partition per CPU. A task that
    reduces a partition holds it whole (dedup's bucket and decide steps), so the partition
    size, not the input size, sets their memory: a fixed count (Ray's default is 200, which
    also costs minutes on small inputs) would grow it with the corpus."""
    from zhchat.runtime import cluster_cpus

    return max(cluster_cpus(), -(-rows // ROWS_PER_PARTITION))


def _train_words(train_dir: str):
    """Stream the train split's words file by file, batch by batch (never all in memory)
    for the BPE trainer, which runs in this process anyway."""
    files = list_parquet(train_dir)
    if not files:
        raise ValueError("the train split is empty after cleaning; nothing to train a tokenizer on "
                         "(add data, lower preprocess.split.validation/test, or pass --tokenizer)")
    column = "words" if "words" in _parquet(files[0]).schema_arrow.names else "turns"
    if column == "turns":
        say("preprocess: [yellow]no `words` column (segmentation off): the tokenizer learns from whole turns[/yellow]")

    def batches():
        for f in files:
            yield from _parquet(f).iter_batches(batch_size=WORDS_BATCH, columns=[column])

    return words_from_batches(batches())


def _parquet(path: str):
    import pyarrow.parquet as pq

    from zhchat.storage import filesystem

    fs, p = filesystem(path)
    return pq.ParquetFile(fs.open_input_file(p))


def _check_inputs(files: list[str]) -> int:
    """Rows in the input tables, after checking each has the dialogue table's columns."""
    rows = 0
    for f in files:
        pf = _parquet(f)
        missing = [c for c in DIALOGUE_SCHEMA.names if c not in pf.schema_arrow.names]
        if missing:
            raise ValueError(f"{f} is not a dialogue table: missing column(s) {', '.join(missing)} "
                             f"(expected {', '.join(DIALOGUE_SCHEMA.names)}, as written by `zhchat ingest`)")
        rows += pf.metadata.num_rows
    return rows


def _count_rows(files: list[str]) -> int:
    """From the Parquet footers: no data is read."""
    return sum(_parquet(f).metadata.num_rows for f in files)


def _clear_outputs(out: str) -> None:
    """Old shards must not mix with new ones (file names are unique per write)."""
    from zhchat.storage import remove

    for part in OUTPUT_PARTS:
        remove(join(out, part))


def _summary(manifest: dict, out: str, skipped: bool) -> dict[str, Any]:
    return {"out": out, "skipped": skipped, "manifest": join(out, MANIFEST), **manifest["counts"],
            "tokenizer": manifest["tokenizer"]}


def _print_summary(s: dict[str, Any]) -> None:
    if s["rule_hits"]:
        summary_table("Cleaning rules", ["rule", "turns changed", "dialogues"],
                      [(r, h["turns"], h["dialogues"]) for r, h in sorted(s["rule_hits"].items())])
    removed = dict(sorted(s["removed"].items(), key=lambda kv: -kv[1]))
    if s["dedup_removed"]:
        removed["duplicate"] = s["dedup_removed"]
    summary_table("Removed dialogues", ["reason", "dialogues"], list(removed.items()) or [("(none)", 0)])
    near = s.get("near_dup") or {}
    if any(v.get("enabled") for v in near.values()):
        summary_table("Near-duplicates (MinHash)", ["level", "checked", "kept", "removed"],
                      [(level, v["checked"], v["kept"], v["removed"]) for level, v in near.items() if v.get("enabled")])
        from rich.markup import escape

        for level, v in near.items():
            for c in (v.get("examples") or [])[:1]:
                if level == "dialogues":
                    say(escape(f"  e.g. kept {c['kept']['id']} {' / '.join(c['kept']['turns'])[:60]!r}; removed "
                               + "; ".join(f"{r['id']} ({r['similarity']}) {' / '.join(r['turns'])[:60]!r}"
                                           for r in c["removed"][:2])))
                else:
                    say(escape(f"  e.g. the reply {c['reply'][:40]!r} after {c['contexts']} different contexts; "
                               "removed " + ", ".join(r["id"] for r in c["removed"][:3])))
    summary_table("Splits", ["split", "dialogues", "sequences", "tokens", "loss tokens"],
                  [(k, v["dialogues"], v["sequences"], v["tokens"], v["loss_tokens"]) for k, v in s["splits"].items()])
    t = s["tokenizer"]
    kv_table("Preprocess", {
        "dialogues read": s["read"], "dialogues kept": s["kept"], "vocabulary": t["vocab_size"],
        f"tokens/char ({t['measured_on']})": t["tokens_per_char"], "tokenizer": t["path"],
        "output": s["out"] + (" (skipped: already done)" if s["skipped"] else ""),
    })
