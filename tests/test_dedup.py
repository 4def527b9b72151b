"""Dedup on Ray Data: exact/normalized keys, and MinHash near-duplicates at both levels."""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
import pytest

from pipelines.dedup import (
    GENERIC_REPLY, NEAR_DUPLICATE, MinHasher, Params, bucket_candidates, dedup, dedup_key, id_hash, jaccard,
    near_dedup, ngrams,
)
from zhchat.config.data import NearDupConfig
from zhchat.tables import DIALOGUE_SCHEMA, dialogue_row


# -- exact / normalized (moved from tests/test_clean.py with the code) ------------------------------
def test_dedup_key_modes():
    a, b = ["你好！", "今天 天气 好"], ["你好", "今天天气好。"]
    assert dedup_key(a, "exact") != dedup_key(b, "exact")
    assert dedup_key(a, "normalized") == dedup_key(b, "normalized")
    assert dedup_key(["Hello"], "normalized") == dedup_key(["hello!"], "normalized")
    # turn boundaries count
    assert dedup_key(["你好", "好"], "normalized") != dedup_key(["你", "好好"], "normalized")
    with pytest.raises(ValueError, match="dedup mode"):
        dedup_key(a, "fuzzy")


def test_dedup_on_ray(ray_cluster):
    import ray

    rows = [
        dialogue_row(["你好！", "你好呀"], "a"),
        dialogue_row(["你好！", "你好呀"], "b"),     # exact duplicate (same id)
        dialogue_row(["你好", "你好呀。"], "c"),      # duplicate only when normalised
        dialogue_row(["Hi", "HELLO"], "d"),
        dialogue_row(["hi", "hello"], "e"),
        dialogue_row(["别的", "对话"], "f"),
    ]
    table = pa.Table.from_pylist(rows, schema=DIALOGUE_SCHEMA)
    ds = ray.data.from_arrow(table).repartition(3)

    # Ray's default shuffle (hash, SHUFFLE_V2)
    kept, dups = dedup(ds, "exact", num_partitions=4)
    kept_rows = kept.take_all()
    assert len(kept_rows) == 5 and {r["source"] for r in kept_rows} == {"a", "c", "d", "e", "f"}
    assert [r["source"] for r in dups.take_all()] == ["b"]
    assert set(kept.schema().names) == set(DIALOGUE_SCHEMA.names)

    # the sort-based shuffle, chosen through this dataset's own DataContext
    from ray.data.context import ShuffleStrategy

    ds_sorted = ray.data.from_arrow(table).repartition(3)
    assert ds_sorted.context is not ray.data.DataContext.get_current()
    ds_sorted.context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    kept, dups = dedup(ds_sorted, "normalized")
    kept_ids = sorted(r["id"] for r in kept.take_all())
    dup_rows = dups.take_all()
    assert len(kept_ids) == 3 and len(dup_rows) == 3
    by_key = {}
    for r in rows:
        by_key.setdefault(dedup_key(r["turns"], "normalized"), []).append(r["id"])
    assert kept_ids == sorted(min(v) for v in by_key.values())   # the lowest id per key is kept
    for r in dup_rows:
        assert r["duplicate_of"] in kept_ids and r["duplicate_of"] <= r["id"]

    kept, dups = dedup(ds, "none")
    assert kept.count() == 6 and dups.count() == 0


def test_mark_duplicates_block_without_ray():
    from pipelines.dedup import KEY, _mark_duplicates

    block = pa.table({KEY: ["k2", "k1", "k2", "k1", "k3"], "id": ["b", "z", "a", "y", "c"],
                      "source": ["s", "s", "s", "s", "s"]})
    out = _mark_duplicates(block).to_pylist()
    assert [(r["id"], r["_dup"], r["duplicate_of"]) for r in out] == [
        ("y", False, ""), ("z", True, "y"), ("a", False, ""), ("b", True, "a"), ("c", False, "")]


# -- MinHash ------------------------------------------------------------------------------------------
HAN = "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本去把性好应开它合还因由其些然前外天政四日那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比或但质气第向道命此变条只没结解问意建月公无系军很情者最立代想已通并提直题党程展五果料象员革位入常文总次品式活设及管特件长求老头基资边流路级少图山统接知较将组见计别她手角期根论运农指几九区强放决西被干做必战先回则任取据处理府研质"


def corpus(n: int, seed: int = 0) -> list[list[str]]:
    """Distinct dialogues: random Chinese characters, 2-5 turns of 10-30 (pairwise Jaccard ~0)."""
    rng = random.Random(seed)
    return [["".join(rng.choice(HAN) for _ in range(rng.randint(10, 30))) for _ in range(rng.randint(2, 5))]
            for _ in range(n)]


def edit(turns: list[str], n_chars: int, seed: int = 1) -> list[str]:
    """`n_chars` characters of the dialogue replaced by others."""
    rng = random.Random(seed)
    turns = [list(t) for t in turns]
    for _ in range(n_chars):
        t = rng.randrange(len(turns))
        i = rng.randrange(len(turns[t]))
        turns[t][i] = rng.choice([c for c in HAN if c != turns[t][i]])
    return ["".join(t) for t in turns]


def test_minhash_estimates_jaccard_and_ignores_order_punctuation_spacing():
    from pipelines.clean import normalize_text

    docs = corpus(300, seed=5)
    variants = [edit(d, 1 + i % 6, seed=i) for i, d in enumerate(docs)]
    mh = MinHasher(256, 3)
    sa, ia = mh.signatures([[normalize_text(t) for t in d] for d in docs])
    sb, ib = mh.signatures([[normalize_text(t) for t in d] for d in variants])
    assert list(ia) == list(ib) == list(range(300))
    estimate = (sa == sb).mean(axis=1)
    exact = np.array([jaccard(ngrams(a, 3), ngrams(b, 3)) for a, b in zip(docs, variants)])
    assert exact.min() < 0.7 < exact.max()
    assert np.abs(estimate - exact).mean() < 0.04      # sd of a 256-permutation estimate is <= 0.031
    assert abs((estimate - exact).mean()) < 0.01       # unbiased
    unrelated = (sa[:150] == sa[150:]).mean()
    assert unrelated < 0.02

    d = ["今天天气真不错，我们去公园散步吧", "好啊，几点出发？"]
    same = [["好啊 几点出发"], ["今天天气真不错!我们去公园散步吧。"]]
    s, _ = mh.signatures([[normalize_text(t) for t in x] for x in (d, same[0] + same[1])])
    assert (s[0] == s[1]).all()
    # a turn shorter than n is one n-gram; an empty text has no signature
    s, idx = mh.signatures([["好"], ["好"], [""], ["好的"]])
    assert list(idx) == [0, 1, 3] and (s[0] == s[1]).all() and not (s[0] == s[2]).any()


def test_minhash_is_the_same_in_every_process(ray_cluster):
    """Worker processes must agree on signatures (no salted hashes anywhere)."""
    import ray

    texts = [["你好世界", "今天天气很好"], ["别的对话", "好"]]

    @ray.remote
    def remote():
        return MinHasher(64, 3).signatures(texts)[0], id_hash(["abc", "def"])

    sig, ids = ray.get(remote.remote())
    assert (sig == MinHasher(64, 3).signatures(texts)[0]).all()
    assert (ids == id_hash(["abc", "def"])).all()


def test_large_bucket_gives_star_candidates_without_ray():
    """A level-1 bucket of 20 dialogues: each member -> the 4 lowest, not 190 pairs."""
    ks = np.arange(100, 120, dtype=np.uint64)
    block = pa.table({"bkey": np.full(20, 7, np.uint64), "k": ks[::-1].copy(), "ctx": np.zeros(20, np.uint64),
                      "level": np.zeros(20, np.int8), "turn": np.full(20, -1, np.int16)})
    out = bucket_candidates(block, Params())
    pairs = set(zip(out.column("src").to_pylist(), out.column("k").to_pylist()))
    assert len(pairs) == 19 + 18 + 17 + 16
    assert all(t in (100, 101, 102, 103) and s > t for s, t in pairs)
    small = bucket_candidates(block.slice(0, 5), Params())
    assert small.num_rows == 10                                     # every pair of 5


def ds_of(dialogues: list[tuple[list[str], str]], blocks: int = 3):
    import ray

    rows = [dialogue_row(t, src) for t, src in dialogues]
    return ray.data.from_arrow(pa.Table.from_pylist(rows, schema=DIALOGUE_SCHEMA)).repartition(blocks), rows


def test_near_duplicate_dialogues_on_ray(ray_cluster):
    base = corpus(40, seed=11)
    original = ["今天下班以后我们一起去新开的那家火锅店吃饭吧", "好啊，听说那家的毛肚特别新鲜，要不要提前订位？",
                "我来订吧，晚上七点怎么样", "没问题，七点见，我叫上小王一起"]
    edited = edit(original, 2, seed=3)                                    # 2 characters changed
    noisy = [" ".join(original[1]), original[0].replace("，", "!!"), original[3], original[2] + "。。。"]  # reordered
    data = [(t, "base") for t in base] + [(original, "orig"), (edited, "edited"), (noisy, "noisy")]
    ds, rows = ds_of(data)
    k = {r["source"]: int(id_hash([r["id"]])[0]) for r in rows[-3:]}
    ids = {r["source"]: r["id"] for r in rows[-3:]}
    keep = min(k, key=k.get)                                              # the lowest id hash stays

    res = near_dedup(ds, NearDupConfig(replies=False), num_partitions=2)
    kept = {r["id"] for r in res.kept.take_all()}
    removed = {r["id"]: r for r in res.removed.take_all()}
    assert ids[keep] in kept and len(kept) == 41
    assert {r["id"] for r in rows[:40]} <= kept                          # distinct dialogues stay
    for src in {"orig", "edited", "noisy"} - {keep}:
        r = removed[ids[src]]
        assert r["near_dup_reason"] == NEAR_DUPLICATE and r["duplicate_of"] == ids[keep]
        assert r["turns"] == rows[[x["source"] for x in rows].index(src)]["turns"]   # the dialogue as it was
    assert set(res.kept.schema().names) == set(DIALOGUE_SCHEMA.names)

    stats = res.stats()
    assert stats["dialogues"] | {"examples": None} == {"enabled": True, "checked": 43, "kept": 41, "removed": 2,
                                                       "examples": None}
    (cluster,) = stats["dialogues"]["examples"]
    assert cluster["kept"]["id"] == ids[keep] and len(cluster["removed"]) == 2
    assert all(0.7 <= m["similarity"] <= 1 for m in cluster["removed"])
    assert stats["replies"]["enabled"] is False and stats["replies"]["removed"] == 0

    # a stricter threshold keeps the 2-character edit (exact Jaccard decides, not the estimate)
    j = jaccard(ngrams(original, 3), ngrams(edited, 3))
    res = near_dedup(ds, NearDupConfig(replies=False, threshold=min(1.0, j + 0.01)), num_partitions=2)
    removed = {r["id"] for r in res.removed.take_all()}
    assert ids["edited"] not in removed or keep == "edited"


def test_near_duplicates_with_the_sort_shuffle(ray_cluster):
    import ray
    from ray.data.context import ShuffleStrategy

    a = ["我们明天早上八点在学校门口集合然后一起坐车去博物馆", "好的我会准时到的记得带上学生证"]
    data = [(t, "base") for t in corpus(10, seed=2)] + [(a, "a"), (edit(a, 1), "b")]
    rows = [dialogue_row(t, s) for t, s in data]
    ds = ray.data.from_arrow(pa.Table.from_pylist(rows, schema=DIALOGUE_SCHEMA)).repartition(2)
    ds.context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    res = near_dedup(ds, NearDupConfig(replies=False))
    removed = res.removed.take_all()
    assert len(removed) == 1 and removed[0]["source"] in ("a", "b")
    assert res.kept.count() == 11


def test_generic_reply_across_contexts_on_ray(ray_cluster):
    """A reply after more than K distinct contexts goes (with near-variants of it); after
    exactly K it stays; one context repeated many times is not many contexts."""
    K = 4
    contexts = ["".join(t) for t in corpus(20, seed=21)]
    data = [([c, "哈哈，太好笑了吧"], f"generic{i}") for i, c in enumerate(contexts[:K + 1])]
    data.append(([contexts[K + 1], "哈哈！太好笑了吧。。。"], "variant"))       # punctuation: the same reply
    data += [([c, "这个问题我也想知道答案"], f"k{i}") for i, c in enumerate(contexts[6:6 + K])]   # exactly K
    data += [([f"开场白第{i}句", contexts[12], "同一个上下文里的回复"], f"same{i}") for i in range(K + 3)]  # one context
    data += [(["".join(t) for t in d], "base") for d in corpus(10, seed=22)]
    ds, rows = ds_of(data)
    res = near_dedup(ds, NearDupConfig(dialogues=False, reply_contexts=K), num_partitions=2)
    removed = {r["source"]: r for r in res.removed.take_all()}
    assert set(removed) == {f"generic{i}" for i in range(K + 1)} | {"variant"}
    generic_ids = {r["id"] for r in rows if r["source"].startswith("generic") or r["source"] == "variant"}
    for r in removed.values():
        assert r["near_dup_reason"] == GENERIC_REPLY
        assert r["duplicate_of"] in generic_ids and r["duplicate_of"] != r["id"]
    stats = res.stats()
    assert stats["replies"]["removed"] == K + 2 and stats["dialogues"]["removed"] == 0
    (example,) = stats["replies"]["examples"]
    assert example["contexts"] == K + 2 and "太好笑了吧" in example["reply"]

    # level 2 on every turn: the generic reply in the middle of a dialogue counts too
    data = [([c, "哈哈，太好笑了吧", "后面又说了别的" + c[:5]], f"mid{i}") for i, c in enumerate(contexts[:K + 1])]
    ds, _ = ds_of(data + [(["".join(t) for t in d], "base") for d in corpus(5, seed=23)])
    last = near_dedup(ds, NearDupConfig(dialogues=False, reply_contexts=K), num_partitions=2)
    assert last.removed.count() == 0
    every = near_dedup(ds, NearDupConfig(dialogues=False, reply_contexts=K, reply_turns="all"), num_partitions=2)
    assert {r["source"] for r in every.removed.take_all()} == {f"mid{i}" for i in range(K + 1)}


def test_near_dedup_off_and_duplicate_ids(ray_cluster):
    a = ["我们明天早上八点在学校门口集合然后一起坐车去博物馆", "好的我会准时到的记得带上学生证"]
    ds, _ = ds_of([(a, "x"), (a, "y"), (["完全不同的一段对话内容", "是的"], "z")])
    res = near_dedup(ds, NearDupConfig(dialogues=False, replies=False))
    assert res.kept.count() == 3 and res.removed.count() == 0
    assert res.stats()["dialogues"] == {"enabled": False}
    # the same id twice (no exact dedup before it): one copy stays
    res = near_dedup(ds, NearDupConfig(), num_partitions=2)
    (r,) = res.removed.take_all()
    assert r["near_dup_reason"] == NEAR_DUPLICATE and r["duplicate_of"] == r["id"] and r["source"] == "y"


def test_near_dedup_through_a_scratch_folder(ray_cluster, tmp_path):
    """The tagged result written to a Parquet folder (as preprocess runs it, so the object
    store does not hold the corpus) gives what the materialised one gives, read from there."""
    import pyarrow.parquet as pq

    a = ["我们明天早上八点在学校门口集合然后一起坐车去博物馆", "好的我会准时到的记得带上学生证"]
    data = [(t, "base") for t in corpus(30, seed=5)] + [(a, "a"), (edit(a, 1), "b"), (a[::-1], "c")]
    ds, rows = ds_of(data)
    scratch = tmp_path / "scratch"
    on_disk = near_dedup(ds, NearDupConfig(replies=False), num_partitions=2, scratch=str(scratch))
    in_store = near_dedup(ds, NearDupConfig(replies=False), num_partitions=2)

    def removed(res):
        return sorted((r["id"], r["duplicate_of"], r["near_dup_reason"]) for r in res.removed.take_all())

    assert removed(on_disk) == removed(in_store) and len(removed(on_disk)) == 2
    assert sorted(r["id"] for r in on_disk.kept.take_all()) == sorted(r["id"] for r in in_store.kept.take_all())
    a, b = on_disk.stats(), in_store.stats()

    def clusters(stats):  # the order of rows inside an example cluster is the order they were read
        return sorted((c["kept"]["id"], sorted(m["id"] for m in c["removed"])) for c in stats["dialogues"]["examples"])

    assert clusters(a) == clusters(b) and len(clusters(a)) >= 1
    assert {k: v for k, v in a["dialogues"].items() if k != "examples"} == \
        {k: v for k, v in b["dialogues"].items() if k != "examples"} and a["replies"] == b["replies"]
    written = pq.read_table(scratch, columns=["id", "_nd_reason"])
    assert written.num_rows == len(rows) and sorted(written.column("id").to_pylist()) == sorted(r["id"] for r in rows)
    assert sum(1 for x in written.column("_nd_reason").to_pylist() if x) == 2


def test_shuffle_map_tasks_have_bounded_input(ray_cluster, monkeypatch):
    """configure_data bounds the input of one hash-shuffle map task. At Ray's default (1 GiB)
    a node's whole input went to one map task: near-dedup's band table in one process,
    growing with the corpus, while the other cores idled. Ray's stats count one output
    block per map task, so 8 input blocks over the bound give 8 map tasks, not 1."""
    import re

    import ray
    from ray.data import DataContext

    from pipelines.dedup import colocate
    from zhchat import runtime

    ctx = DataContext.get_current()
    monkeypatch.setattr(ctx, "shuffle_input_batch_bytes", ctx.shuffle_input_batch_bytes)  # restored after
    monkeypatch.setattr(runtime, "SHUFFLE_BATCH_BYTES", 2000)  # each 500-row block is ~4 KB
    runtime.configure_data()
    assert ctx.shuffle_input_batch_bytes == 2000
    out = colocate(ray.data.range(4000, override_num_blocks=8), "id", 4).materialize()
    assert out.count() == 4000
    (line,) = [x for x in out.stats().splitlines() if "HashShuffleMap" in x and "blocks produced" in x]
    assert int(re.search(r"(\d+) blocks produced", line).group(1)) == 8, line
