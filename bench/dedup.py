"""Benchmark of near-duplicate removal (pipelines/dedup.py) on Ray Data, 2 CPUs.

    python bench/dedup.py            # >= 30 MB corpus
    python bench/dedup.py --quick    # 3 MB: a smoke run that proves the script works

In one run it
1. generates a deterministic corpus of Chinese dialogues from pieces: the clauses of the
   bundled sample's turns (zhchat/data/sample, cleaned and split at punctuation) and the
   templated everyday utterances of bench/preprocess.py, 1-3 clauses a turn, 2-8 turns a
   dialogue, as Parquet in the dialogue-table layout;
2. plants near-duplicates: 4% of the dialogues get 1-3 variants each, every variant with
   a random non-empty mix of character edits (substitutions, insertions, deletions: one per
   30 characters, at least one), changed punctuation, LCCC-style spacing and reordered
   turns; those (original, variants) clusters are the ground truth;
3. on a fresh 2-CPU local cluster times the segment stage as bench/preprocess.py does
   (`ray_stage`: read Parquet, segment_dataset, write Parquet), and on another the
   near-duplicate stage with the default config (read Parquet, near_dedup at both levels,
   write kept and removed Parquet).

Recall: planted variants removed at level 1 naming a dialogue of their own cluster, over
all planted variants. Precision: level-1 removals that name a dialogue of their own planted
cluster, over all level-1 removals. Throughput ratio: the near-duplicate stage's chars/s
over the segment stage's (target >= 0.5). The last line is JSON:
{"recall": ..., "precision": ..., "throughput_ratio": ..., ...}. Needs psutil.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ["PYTHONPATH"] = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")

import preprocess as bp  # bench/preprocess.py: corpus pieces, memory sampler, segment stage

SAMPLE = ROOT / "zhchat" / "data" / "sample"
PUNCT = "，。！？；…～"
_CLAUSE = re.compile(r"[^，。！？；…～,.!?;~]+[，。！？；…～,.!?;~]*")
PLANT_SHARE = 0.04
CHARS_PER_EDIT = 30


def sample_clauses() -> list[str]:
    """Clauses of the sample's dialogue turns, cleaned as preprocess would (spacing undone)."""
    from pipelines.clean import clean_text
    from pipelines.ingest import plan_inputs
    from pipelines.ingest.chunks import read_chunk
    from zhchat.config import CleanConfig

    cfg = CleanConfig()
    chunks, _ = plan_inputs([str(SAMPLE)], "auto", 1 << 25)
    out: set[str] = set()
    for chunk in chunks:
        if chunk["path"].endswith(".md"):
            continue
        for kind, row in read_chunk(chunk):
            if kind != "ok":
                continue
            for turn in row["turns"]:
                for clause in _CLAUSE.findall(clean_text(turn, cfg)):
                    if len(clause) >= 3:
                        out.add(clause)
    return sorted(out)


class DialogueMaker:
    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.gen = bp.CorpusGenerator(seed)
        self.clauses = sample_clauses()
        self.han = sorted({ch for c in self.clauses for ch in c if "\u4e00" <= ch <= "\u9fff"})

    def turn(self) -> str:
        r = self.rng
        parts = [r.choice(self.clauses) if r.random() < 0.6 else self.gen.utterance() for _ in range(r.randint(1, 3))]
        return "".join(parts)

    def dialogue(self) -> list[str]:
        return [self.turn() for _ in range(self.rng.randint(2, 8))]

    # -- planted variants ----------------------------------------------------------------------
    def edit_chars(self, turns: list[str]) -> list[str]:
        r = self.rng
        turns = list(turns)
        han_total = sum(1 for t in turns for ch in t if "\u4e00" <= ch <= "\u9fff")
        for _ in range(max(1, han_total // CHARS_PER_EDIT)):
            i = r.randrange(len(turns))
            t = turns[i]
            spots = [j for j, ch in enumerate(t) if "\u4e00" <= ch <= "\u9fff"]
            if not spots:
                continue
            j = r.choice(spots)
            op = r.random()
            if op < 0.6:
                t = t[:j] + r.choice(self.han) + t[j + 1:]
            elif op < 0.8:
                t = t[:j] + r.choice(self.han) + t[j:]
            elif len(t) > 1:
                t = t[:j] + t[j + 1:]
            turns[i] = t
        return turns

    def edit_punct(self, turns: list[str]) -> list[str]:
        r = self.rng
        out = []
        for t in turns:
            t = "".join(r.choice(PUNCT + "!?,. ") if ch in PUNCT and r.random() < 0.5 else ch for ch in t)
            if r.random() < 0.3:
                t += r.choice(["！", "？", "。。。", "~~", "!!"])
            out.append(t)
        return out

    def edit_spacing(self, turns: list[str]) -> list[str]:
        r = self.rng
        return [" ".join(t) if r.random() < 0.5 else t.replace("，", " ，  ") for t in turns]

    def reorder(self, turns: list[str]) -> list[str]:
        turns = list(turns)
        while len(turns) > 1:
            shuffled = turns[:]
            self.rng.shuffle(shuffled)
            if shuffled != turns:
                return shuffled
        return turns

    def variant(self, turns: list[str]) -> tuple[list[str], list[str]]:
        r = self.rng
        edits = [e for e in ("chars", "punct", "spacing", "reorder") if r.random() < 0.5] or [r.choice(
            ["chars", "punct", "spacing", "reorder"])]
        for e in edits:
            turns = getattr(self, {"chars": "edit_chars", "punct": "edit_punct", "spacing": "edit_spacing",
                                   "reorder": "reorder"}[e])(turns)
        return turns, edits


def write_corpus(folder: Path, megabytes: float, seed: int, per_file: int = 8000) -> dict:
    """Parquet files of DIALOGUE_SCHEMA rows until the turns hold `megabytes` of UTF-8;
    returns the planted clusters as {id: cluster number} beside the sizes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from zhchat.tables import DIALOGUE_SCHEMA, dialogue_row

    folder.mkdir(parents=True, exist_ok=True)
    maker = DialogueMaker(seed)
    rng = random.Random(seed + 1)
    target = megabytes * 1e6
    size = chars = files = 0
    cluster_of: dict[str, int] = {}
    seen: set[str] = set()
    edit_kinds: dict[str, int] = {}
    rows: list[dict] = []
    n_clusters = n_variants = 0

    def add(turns: list[str]) -> str | None:
        nonlocal size, chars
        row = dialogue_row(turns, f"bench-{seed}")
        if row["id"] in seen:
            return None
        seen.add(row["id"])
        rows.append(row)
        chars += sum(map(len, turns))
        size += sum(len(t.encode("utf-8")) for t in turns)
        return row["id"]

    while size < target:
        turns = maker.dialogue()
        first = add(turns)
        if first and rng.random() < PLANT_SHARE:
            members = [first]
            for _ in range(rng.randint(1, 3)):
                v, kinds = maker.variant(turns)
                vid = add(v)
                if vid:
                    members.append(vid)
                    for k in kinds:
                        edit_kinds[k] = edit_kinds.get(k, 0) + 1
            if len(members) > 1:
                for m in members:
                    cluster_of[m] = n_clusters
                n_clusters += 1
                n_variants += len(members) - 1
        if len(rows) >= per_file or size >= target:
            rng.shuffle(rows)  # variants not next to their original
            pq.write_table(pa.Table.from_pylist(rows, schema=DIALOGUE_SCHEMA), folder / f"part-{files:05d}.parquet")
            files += 1
            rows = []
    return {"path": str(folder), "files": files, "dialogues": len(seen), "chars": chars, "mb": round(size / 1e6, 1),
            "clusters": n_clusters, "variants": n_variants, "edit_kinds": edit_kinds, "cluster_of": cluster_of}


def dedup_stage(folder: Path, out: Path, chars: int, materialize: bool = False) -> dict:
    """read Parquet -> near_dedup (default config, both levels) -> write kept and removed."""
    import pyarrow.parquet as pq
    import ray

    from pipelines.dedup import near_dedup
    from zhchat.config.data import NearDupConfig

    shutil.rmtree(out, ignore_errors=True)
    files = sorted(str(p) for p in folder.glob("*.parquet"))
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    from pipelines.preprocess import shuffle_partitions

    parts = shuffle_partitions(rows)  # as preprocess chooses them
    sampler = bp.MemorySampler()
    idle, _ = sampler.sample()
    idle_heap, idle_store = sampler.peak_heap, sampler.peak_object_store
    with sampler:
        t0 = time.perf_counter()
        res = near_dedup(ray.data.read_parquet(files), NearDupConfig(), num_partitions=parts,
                         scratch=None if materialize else str(out / "scratch"))  # as preprocess runs it
        res.kept.write_parquet(str(out / "kept"))
        res.removed.write_parquet(str(out / "removed"))
        seconds = time.perf_counter() - t0
    top = sorted(sampler.heap_by_process.items(), key=lambda kv: -kv[1])[:6]
    print("heap at its peak by process: " + ", ".join(f"{k} {v / 2**20:,.0f} MB" for k, v in top), flush=True)
    stats = res.stats()
    removed = pq.read_table(out / "removed", columns=["id", "duplicate_of", "near_dup_reason"]).to_pylist()
    kept_n = sum(pq.ParquetFile(p).metadata.num_rows for p in (out / "kept").glob("*.parquet"))
    return {"chars": chars, "seconds": round(seconds, 2), "chars_per_s": chars / seconds, "stats": stats,
            "removed": removed, "kept": kept_n, "idle_mb": round(idle / 2**20), "peak_mb": round(sampler.peak / 2**20),
            "heap_above_idle_mb": round((sampler.peak_heap - idle_heap) / 2**20),
            "object_store_above_idle_mb": round((sampler.peak_object_store - idle_store) / 2**20), "partitions": parts}


def fresh_cluster(fn, *args, object_store_mb: int | None = None, shuffle: str = "hash"):
    """fn(*args) on a new 2-CPU local cluster set up as bench/preprocess.py's (same warm-up)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING,
             object_store_memory=object_store_mb << 20 if object_store_mb else None)
    try:
        from ray.data.context import ShuffleStrategy

        from zhchat.runtime import configure_data

        configure_data()
        if shuffle == "sort":
            ray.data.DataContext.get_current().shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
        ray.data.DataContext.get_current().enable_progress_bars = False
        ray.data.range(16, override_num_blocks=4).map_batches(lambda b: b, num_cpus=0.5).count()
        return fn(*args)
    finally:
        ray.shutdown()


def score(removed: list[dict], cluster_of: dict[str, int], variants: int) -> dict:
    level1 = [r for r in removed if r["near_dup_reason"] == "near_duplicate"]
    good = sum(1 for r in level1 if r["id"] in cluster_of and cluster_of.get(r["duplicate_of"]) == cluster_of[r["id"]])
    wrong = [r for r in level1 if not (r["id"] in cluster_of and cluster_of.get(r["duplicate_of"]) == cluster_of[r["id"]])]
    return {"recall": good / max(variants, 1), "precision": good / max(len(level1), 1), "found": good,
            "level1_removed": len(level1), "false": len(wrong), "false_examples": wrong[:3],
            "level2_removed": sum(1 for r in removed if r["near_dup_reason"] != "near_duplicate")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 MB corpus: a smoke run, numbers mean nothing")
    ap.add_argument("--mb", type=float, help="corpus size in MB of UTF-8 text (default 30, --quick 3)")
    ap.add_argument("--workdir", help="where to put the corpus (default: a temporary folder, removed)")
    ap.add_argument("--growth", action="store_true", help="also run a corpus twice the size and report the "
                    "peak memory of both (summed PSS of every Ray process: the object store's pages count in the "
                    "workers that map them)")
    ap.add_argument("--object-store-mb", type=int, help="cap the object store (Ray spills above it)")
    ap.add_argument("--shuffle", choices=["hash", "sort"], default="hash",
                    help="Ray Data's shuffle: hash (its default) or sort (map outputs in the object store)")
    ap.add_argument("--materialize", action="store_true",
                    help="hold the tagged result in the object store instead of a scratch Parquet folder")
    args = ap.parse_args()
    cluster = {"object_store_mb": args.object_store_mb, "shuffle": args.shuffle}
    mb = args.mb or (3.0 if args.quick else 30.0)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="zhchat-bench-dedup-"))
    try:
        t0 = time.perf_counter()
        corpus = write_corpus(work / "corpus", mb, seed=7)
        print(f"corpus: {corpus['mb']} MB ({corpus['chars']:,} chars, {corpus['dialogues']:,} dialogues, "
              f"{corpus['files']} files); planted {corpus['clusters']:,} clusters with {corpus['variants']:,} "
              f"variants (edits used: {corpus['edit_kinds']}); generated in {time.perf_counter() - t0:.0f} s", flush=True)

        seg = bp.fresh_cluster_stage(work / "corpus", work / "out", corpus["chars"])
        print(f"segment stage (2 CPUs): {seg['chars_per_s']:,.0f} chars/s ({seg['seconds']} s)", flush=True)
        dd = fresh_cluster(dedup_stage, work / "corpus", work / "out", corpus["chars"], args.materialize, **cluster)
        print(f"near-duplicate stage (2 CPUs): {dd['chars_per_s']:,.0f} chars/s ({dd['seconds']} s), peak memory "
              f"{dd['peak_mb']:,} MB (idle cluster {dd['idle_mb']:,} MB)", flush=True)
        s = score(dd["removed"], corpus["cluster_of"], corpus["variants"])
        levels = dd["stats"]
        print(f"level 1 (dialogues): removed {levels['dialogues']['removed']:,}, kept {levels['dialogues']['kept']:,}; "
              f"level 2 (replies): removed {levels['replies']['removed']:,}", flush=True)
        for r in s["false_examples"]:
            print(f"  removed outside its planted cluster: {r}", flush=True)
        growth = {}
        if args.growth:
            big = write_corpus(work / "corpus_2x", 2 * mb, seed=8)
            dd2 = fresh_cluster(dedup_stage, work / "corpus_2x", work / "out", big["chars"], args.materialize, **cluster)
            s2 = score(dd2["removed"], big["cluster_of"], big["variants"])
            growth = {"peak_mb_2x": dd2["peak_mb"], "memory_growth_2x": round(dd2["peak_mb"] / dd["peak_mb"], 3),
                      "above_idle_growth_2x": round((dd2["peak_mb"] - dd2["idle_mb"]) / max(dd["peak_mb"] - dd["idle_mb"], 1), 3),
                      # Heap (anonymous + file pages of every process) and the object store's
                      # shared-memory pages, each above the idle cluster: the heap is what can
                      # exhaust a node's memory; the store spills to disk when full.
                      "heap_growth_2x": round(dd2["heap_above_idle_mb"] / max(dd["heap_above_idle_mb"], 1), 3),
                      "object_store_growth_2x": round(dd2["object_store_above_idle_mb"]
                                                      / max(dd["object_store_above_idle_mb"], 1), 3),
                      "recall_2x": round(s2["recall"], 4), "precision_2x": round(s2["precision"], 4),
                      "dedup_chars_per_s_2x": round(dd2["chars_per_s"])}
            print(f"2x corpus ({big['mb']} MB): {dd2['chars_per_s']:,.0f} chars/s, peak memory {dd2['peak_mb']:,} MB "
                  f"(idle {dd2['idle_mb']:,} MB): {growth['memory_growth_2x']}x the 1x peak; above idle, heap "
                  f"{dd['heap_above_idle_mb']:,} -> {dd2['heap_above_idle_mb']:,} MB ({growth['heap_growth_2x']}x), "
                  f"object store {dd['object_store_above_idle_mb']:,} -> {dd2['object_store_above_idle_mb']:,} MB "
                  f"({growth['object_store_growth_2x']}x); recall "
                  f"{s2['recall']:.4f}, precision {s2['precision']:.4f}", flush=True)
        ratio = dd["chars_per_s"] / seg["chars_per_s"]
        print(f"recall {s['recall']:.4f} (target >= 0.95), precision {s['precision']:.4f} (>= 0.98), "
              f"throughput ratio {ratio:.2f} (>= 0.5)")
        print(json.dumps({
            "recall": round(s["recall"], 4), "precision": round(s["precision"], 4), "throughput_ratio": round(ratio, 3),
            "dedup_chars_per_s": round(dd["chars_per_s"]), "segment_chars_per_s": round(seg["chars_per_s"]),
            "dedup_seconds": dd["seconds"], "segment_seconds": seg["seconds"], "planted_variants": corpus["variants"],
            "found": s["found"], "level1_removed": s["level1_removed"], "level2_removed": s["level2_removed"],
            "corpus_mb": corpus["mb"], "corpus_chars": corpus["chars"], "dialogues": corpus["dialogues"],
            "peak_mb": dd["peak_mb"], "idle_mb": dd["idle_mb"], "heap_above_idle_mb": dd["heap_above_idle_mb"],
            "object_store_above_idle_mb": dd["object_store_above_idle_mb"], "materialize": args.materialize, **growth, "quick": args.quick,
        }, ensure_ascii=False))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
