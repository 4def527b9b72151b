"""Duplicate removal on Ray Data: exact keys, and MinHash near-duplicates at two levels.

Exact (`dedup`): a hash of the turns as they are ("exact") or with punctuation, symbols,
white space and case removed ("normalized"); one shuffle groups each key, the lowest id is
kept and the others point at it (`duplicate_of`).

Near-duplicates (`near_dedup`, config clean.near_dup) work on the normalised text (NFKC,
case folded, punctuation/symbols/spaces dropped) cut into character n-grams, each turn on
its own (a turn shorter than n is one n-gram), so that reordered turns, spacing and
punctuation change nothing and a few edited characters change a few n-grams:

  level 1, dialogues   the n-gram set of the whole dialogue. Two dialogues whose sets have
                       a Jaccard similarity >= threshold are near-duplicates; of each such
                       pair the one with the lower id hash is kept, the other removed with
                       reason "near_duplicate" and the kept one's id.
  level 2, replies     the n-gram set of each reply (the last turn, or every turn after the
                       first) beside a hash of its context (the turn before it). A reply whose
                       near-duplicates follow more than K distinct contexts is the generic-reply
                       pattern: its dialogue is removed with reason "generic_reply_cross_context"
                       and the id of a dialogue with that reply.

How it runs, with nothing collected on the driver and every step streaming or shuffling:

  1. map: a MinHash signature per text (numpy, vectorised over the batch: one 64-bit hash per
     n-gram, num_perm multiply-add permutations, minimum per text), cut into `bands` bands of
     rows = num_perm // bands values; one row (band hash, id hash[, context hash]) per band.
  2. shuffle by band hash (Ray Data hash shuffle or sort): texts sharing a band are in one
     block. Level 1 buckets give candidate pairs (all pairs in a small bucket, each member to
     the 4 lowest in a large one), level 2 buckets with more than K distinct contexts give
     (member -> lowest member).
  3. shuffle the candidates by their target with the targets' text: each candidate picks up
     the text it must be compared with.
  4. shuffle the dialogues with the candidates aimed at them by id hash: the exact n-gram
     Jaccard similarity is computed for each candidate (so the LSH step only has to find
     them: precision does not depend on the signature length), and each dialogue gets its
     reason, the id it duplicates and the similarity.

The removal rule is local: a dialogue goes when it is verified similar to one with a lower id
hash, so no two kept dialogues are near-duplicates and no iteration to connected components
is needed; in a chain a~b~c with a !~ c both b and c go (as with connected components) and
c names b.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .clean import as_turn_lists, normalize_text

# -- exact / normalized keys ------------------------------------------------------------------
KEY = "_dedup_key"
DEDUP_MODES = ("exact", "normalized")


def _normalize(turn: str) -> str:
    # Drop punctuation (P*), symbols (S*, incl. emoji), separators (Z*) and other (C*).
    return "".join(ch for ch in unicodedata.normalize("NFKC", turn).casefold()
                   if unicodedata.category(ch)[0] not in "PSZC")


def dedup_key(turns: Sequence[str], mode: str) -> str:
    """A short hash of the dialogue's turns ("exact") or of the turns with punctuation,
    symbols, white space and case removed ("normalized"). Turn boundaries count."""
    if mode == "exact":
        parts = list(turns)
    elif mode == "normalized":
        parts = [_normalize(t) for t in turns]
    else:
        raise ValueError(f"dedup mode must be one of {DEDUP_MODES}, got {mode!r}")
    return hashlib.blake2b(json.dumps(parts, ensure_ascii=False).encode("utf-8"), digest_size=16).hexdigest()


def _add_key(batch, mode: str):
    import pyarrow as pa

    keys = [dedup_key(t, mode) for t in as_turn_lists(batch.column("turns").to_pylist())]
    return batch.append_column(KEY, pa.array(keys, pa.string()))


def _mark_duplicates(block):
    """Rows of one key are all in this block (the shuffle put them there): sort by
    (key, id, source); the first row of each key is kept, the others point at it."""
    import pyarrow as pa

    order = [(c, "ascending") for c in (KEY, "id", "source") if c in block.column_names]
    block = block.sort_by(order)
    n = block.num_rows
    keys = block.column(KEY).to_numpy(zero_copy_only=False)
    ids = block.column("id").to_numpy(zero_copy_only=False)
    first = np.ones(n, dtype=bool)
    first[1:] = keys[1:] != keys[:-1]
    first_row = np.maximum.accumulate(np.where(first, np.arange(n), 0))
    block = block.append_column("_dup", pa.array(~first, pa.bool_()))
    return block.append_column("duplicate_of", pa.array(np.where(first, "", ids[first_row]).tolist(), pa.string()))


def _select(batch, duplicates: bool):
    import pyarrow.compute as pc

    mask = batch.column("_dup")
    out = batch.filter(mask if duplicates else pc.invert(mask))
    drop = [KEY, "_dup"] + ([] if duplicates else ["duplicate_of"])
    return out.drop_columns(drop)


def colocate(ds, key: str, num_partitions: int | None = None):
    """`ds` shuffled so that all rows of one `key` value are in one block, sorted by it
    inside the block (hash shuffle: one partition per block; sort shuffle: a range each).
    What GroupedData.map_groups does, minus its Python call per group."""
    from ray.data.context import ShuffleStrategy

    ctx = ds.context
    if ctx.shuffle_strategy in (ShuffleStrategy.SHUFFLE_V2, ShuffleStrategy.HASH_SHUFFLE):
        return ds.repartition(num_partitions or ctx.default_hash_shuffle_parallelism, keys=[key], sort=True)
    return ds.sort(key)


def dedup(ds, mode: str, num_partitions: int | None = None):
    """(kept, duplicates) Ray datasets. Rows are grouped by `dedup_key` with Ray Data's
    shuffle (spills to disk, so larger than memory works); in each group the lowest id
    (then source) is kept. Duplicates get a `duplicate_of` column naming the kept id.

    The grouped result is materialised once (in the object store, spilling to disk as
    needed) because both outputs read it; otherwise the shuffle would run twice.
    mode "none" returns (ds, an empty dataset)."""
    if mode == "none":
        return ds, ds.limit(0)
    if mode not in DEDUP_MODES:
        raise ValueError(f"dedup mode must be one of {DEDUP_MODES + ('none',)}, got {mode!r}")
    keyed = ds.map_batches(_add_key, fn_kwargs={"mode": mode}, batch_format="pyarrow")
    tagged = colocate(keyed, KEY, num_partitions).map_batches(_mark_duplicates, batch_size=None, batch_format="pyarrow")
    tagged = tagged.materialize()
    kept = tagged.map_batches(_select, fn_kwargs={"duplicates": False}, batch_format="pyarrow")
    dups = tagged.map_batches(_select, fn_kwargs={"duplicates": True}, batch_format="pyarrow")
    return kept, dups


# -- near-duplicates: text, n-grams, exact similarity -------------------------------------------
NEAR_DUPLICATE = "near_duplicate"
GENERIC_REPLY = "generic_reply_cross_context"
REASONS = {0: NEAR_DUPLICATE, 1: GENERIC_REPLY}
LEVELS = {NEAR_DUPLICATE: "dialogues", GENERIC_REPLY: "replies"}

_SEP = "\x01"  # between turns in the batch string; a C* character, so never left in normalised text


def ngrams(turns: Sequence[str], n: int, normalized: bool = False) -> set[str]:
    """The n-gram set of some turns: each turn's character n-grams (never across turns; a
    non-empty turn shorter than n is one n-gram)."""
    out: set[str] = set()
    for t in turns:
        t = t if normalized else normalize_text(t)
        if len(t) < n:
            if t:
                out.add(t)
        else:
            out.update(t[i:i + n] for i in range(len(t) - n + 1))
    return out


def jaccard(a: set, b: set) -> float:
    if not a or not b:
        return 0.0
    inter = len(a & b)
    return inter / (len(a) + len(b) - inter)


def id_hash(ids: Sequence[str]) -> np.ndarray:
    """A stable 64-bit hash of each id (blake2b, never Python's salted hash)."""
    return np.fromiter((int.from_bytes(hashlib.blake2b(str(i).encode("utf-8"), digest_size=8).digest(), "little")
                        for i in ids), dtype=np.uint64, count=len(ids))


# -- MinHash on numpy ---------------------------------------------------------------------------
_U64 = np.uint64


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, element-wise on uint64 (wrapping arithmetic)."""
    x = x ^ (x >> _U64(30))
    x = x * _U64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> _U64(27))
    x = x * _U64(0x94D049BB133111EB)
    return x ^ (x >> _U64(31))


class MinHasher:
    """MinHash signatures of n-gram sets, vectorised over a whole batch of texts.

    Each n-gram gets one 64-bit hash (a polynomial of its code points with random odd
    coefficients, then splitmix64); permutation k maps a hash h to A_k*h + B_k mod 2**64
    (multiply-add with random odd A_k, the multiply-shift family: its high bits are the
    well-mixed ones, and they decide the minimum); the signature keeps the high 32 bits of
    each minimum. The same seed gives the same signatures on every worker."""

    CHUNK = 1 << 16  # n-grams per (num_perm x CHUNK) block of work: ~32 MB at 64 permutations

    def __init__(self, num_perm: int, n: int, seed: int = 0x5EED):
        rng = np.random.default_rng(seed)
        self.num_perm, self.n = num_perm, n
        self.a = (rng.integers(1, 2**63, size=(num_perm, 1), dtype=np.uint64) << _U64(1)) | _U64(1)
        self.b = rng.integers(0, 2**63, size=(num_perm, 1), dtype=np.uint64) << _U64(1)
        self.coef = (rng.integers(1, 2**63, size=n + 1, dtype=np.uint64) << _U64(1)) | _U64(1)
        self.band_coef = (rng.integers(1, 2**63, size=num_perm + 2, dtype=np.uint64) << _U64(1)) | _U64(1)
        # a turn shorter than n is one n-gram, salted by its length
        self.short_salt = rng.integers(0, 2**63, size=n, dtype=np.uint64)

    def ngram_hashes(self, texts: Sequence[Sequence[str]]) -> tuple[np.ndarray, np.ndarray]:
        """(hashes, text index) of every n-gram of every text; a text is a list of normalised
        turns. Text i's n-grams are contiguous and in order of i."""
        n = self.n
        parts: list[str] = []
        short_start: list[int] = []
        short_len: list[int] = []
        short_doc: list[int] = []
        doc_chars = np.zeros(len(texts), dtype=np.int64)
        pos = 0
        for d, turns in enumerate(texts):
            start = pos
            for t in turns:
                if not t:
                    continue
                if len(t) < n:
                    short_start.append(pos)
                    short_len.append(len(t))
                    short_doc.append(d)
                parts.append(t)
                parts.append(_SEP)
                pos += len(t) + 1
            doc_chars[d] = pos - start
        if pos == 0:
            return np.zeros(0, np.uint64), np.zeros(0, np.int64)
        cp = np.frombuffer("".join(parts).encode("utf-32-le"), dtype="<u4").astype(np.uint64)
        total = len(cp)
        doc_of_char = np.repeat(np.arange(len(texts), dtype=np.int64), doc_chars)
        m = total - n + 1
        out_h, out_d = [], []
        sl, ss = np.asarray(short_len, np.int64), np.asarray(short_start, np.int64)
        sd = np.asarray(short_doc, np.int64)
        acc = np.zeros(total, dtype=np.uint64)
        for j in range(n):
            # acc[i] = sum_{q<=j} cp[i+q] * coef[q], the window of length j+1 at i: after the
            # last step the n-grams; on the way, the short turns of length j+1 are taken
            acc[: total - j] += cp[j:] * self.coef[j]
            if len(sl):
                pick = sl == j + 1
                if pick.any():
                    out_h.append(_mix(acc[ss[pick]] + self.short_salt[j]))
                    out_d.append(sd[pick])
        if m > 0:
            sep = np.concatenate(([0], np.cumsum(cp == ord(_SEP))))
            valid = np.flatnonzero(sep[n:] - sep[:-n] == 0)
            out_h.append(_mix(acc[valid]))
            out_d.append(doc_of_char[valid])
        if not out_h:
            return np.zeros(0, np.uint64), np.zeros(0, np.int64)
        hs, ds = np.concatenate(out_h), np.concatenate(out_d)
        order = np.argsort(ds, kind="stable")
        return hs[order], ds[order]

    def signatures(self, texts: Sequence[Sequence[str]]) -> tuple[np.ndarray, np.ndarray]:
        """(signatures uint32 [texts with n-grams, num_perm], their indices into texts)."""
        hs, ds = self.ngram_hashes(texts)
        if len(hs) == 0:
            return np.zeros((0, self.num_perm), np.uint32), np.zeros(0, np.int64)
        starts = np.flatnonzero(np.concatenate(([True], ds[1:] != ds[:-1])))
        docs = ds[starts]
        bounds = np.append(starts, len(hs))
        sig = np.empty((len(docs), self.num_perm), dtype=np.uint32)
        i = 0
        while i < len(docs):
            # whole texts per chunk, about CHUNK n-grams (one long text may exceed it alone)
            j = int(np.searchsorted(bounds, bounds[i] + self.CHUNK, side="right")) - 1
            j = min(max(j, i + 1), len(docs))
            lo, hi = bounds[i], bounds[j]
            block = self.a * hs[lo:hi][None, :]
            block += self.b
            mins = np.minimum.reduceat(block, bounds[i:j] - lo, axis=1)
            sig[i:j] = (mins >> _U64(32)).T
            i = j
        return sig, docs

    def band_keys(self, sig: np.ndarray, bands: int, level: int) -> np.ndarray:
        """[texts, bands] uint64: a hash of each band's rows, salted by band and level."""
        rows = self.num_perm // bands
        s = sig[:, : bands * rows].astype(np.uint64).reshape(len(sig), bands, rows)
        key = np.zeros((len(sig), bands), dtype=np.uint64)
        for r in range(rows):
            key += s[:, :, r] * self.band_coef[r]
        key += np.arange(bands, dtype=np.uint64)[None, :] * self.band_coef[-2] + _U64(level) * self.band_coef[-1]
        return _mix(key)


# -- the Ray Data steps ------------------------------------------------------------------------------
ALL_PAIRS_BUCKET = 8   # buckets up to this size give every pair; larger ones each member -> the 4 lowest
STAR_TARGETS = 4
_K = "_nd_k"
# step 4's candidate columns (null on the dialogue rows, which have _nd_level -1)
RESULT_COLUMNS = ("_nd_level", "_nd_a_turn", "_nd_ctxn", "_nd_b_k", "_nd_b_id", "_nd_b_text")
# what step 4 adds to every dialogue ("" / 0 / null when it stays)
OUT_COLUMNS = ("_nd_reason", "_nd_of", "_nd_sim", "_nd_contexts", "_nd_of_turns")


def _band_schema():
    import pyarrow as pa

    return pa.schema([("bkey", pa.uint64()), ("k", pa.uint64()), ("ctx", pa.uint64()), ("level", pa.int8()),
                      ("turn", pa.int32())])


def _target_schema():
    """Step 3's rows: every dialogue's text (level -1, k = its id hash) and the candidates
    (k = the target to compare with, src = the dialogue that may go)."""
    import pyarrow as pa

    return pa.schema([("k", pa.uint64()), ("level", pa.int8()), ("src", pa.uint64()), ("a_turn", pa.int32()),
                      ("b_turn", pa.int32()), ("ctxn", pa.int32()), ("id", pa.string()),
                      ("turns", pa.list_(pa.string()))])


def _result_fields():
    import pyarrow as pa

    return [pa.field("_nd_level", pa.int8()), pa.field("_nd_a_turn", pa.int32()), pa.field("_nd_ctxn", pa.int32()),
            pa.field("_nd_b_k", pa.uint64()), pa.field("_nd_b_id", pa.string()),
            pa.field("_nd_b_text", pa.list_(pa.string()))]


def _step4_schema(schema):
    import pyarrow as pa

    return pa.schema(list(schema) + [pa.field(_K, pa.uint64())] + _result_fields())


def reply_turns(turns: Sequence[str], which: str) -> list[int]:
    """Indices of a dialogue's replies: the last turn, or every turn after the first (a
    one-turn dialogue has none: there is no context)."""
    if len(turns) < 2:
        return []
    return [len(turns) - 1] if which == "last" else list(range(1, len(turns)))


@dataclass(frozen=True)
class Params:
    """What the workers need of NearDupConfig (a plain, picklable copy)."""

    dialogues: bool = True
    replies: bool = True
    threshold: float = 0.7
    ngram: int = 3
    num_perm: int = 64
    bands: int = 16
    reply_contexts: int = 10
    reply_turns: str = "last"

    @classmethod
    def of(cls, cfg) -> Params:
        return cls(cfg.dialogues, cfg.replies, cfg.threshold, cfg.ngram, cfg.num_perm, cfg.bands,
                   cfg.reply_contexts, cfg.reply_turns)


_HASHERS: dict[tuple[int, int], MinHasher] = {}


def hasher(p: Params) -> MinHasher:
    key = (p.num_perm, p.ngram)
    if key not in _HASHERS:
        _HASHERS[key] = MinHasher(p.num_perm, p.ngram)
    return _HASHERS[key]


def band_rows(batch, p: Params):
    """Step 1: one row per (text, band): band hash, id hash, context hash, level, turn."""
    import pyarrow as pa

    k = id_hash(batch.column("id").to_pylist())
    norm = [[normalize_text(t) for t in ts] for ts in as_turn_lists(batch.column("turns").to_pylist())]
    mh = hasher(p)
    out = []
    if p.dialogues:
        sig, docs = mh.signatures(norm)
        keys = mh.band_keys(sig, p.bands, 0)
        out.append(pa.table({"bkey": keys.ravel(), "k": np.repeat(k[docs], keys.shape[1]),
                             "ctx": np.zeros(keys.size, np.uint64), "level": np.zeros(keys.size, np.int8),
                             "turn": np.full(keys.size, -1, np.int32)}, schema=_band_schema()))
    if p.replies:
        texts, owner, turn_i, ctx = [], [], [], []
        for d, ts in enumerate(norm):
            for i in reply_turns(ts, p.reply_turns):
                if ts[i]:
                    texts.append([ts[i]])
                    owner.append(d)
                    turn_i.append(i)
                    ctx.append(ts[i - 1])
        if texts:
            sig, docs = mh.signatures(texts)
            keys = mh.band_keys(sig, p.bands, 1)
            nb = keys.shape[1]
            ctx_h = id_hash([ctx[i] for i in docs])
            out.append(pa.table({"bkey": keys.ravel(), "k": np.repeat(k[np.asarray(owner)[docs]], nb),
                                 "ctx": np.repeat(ctx_h, nb), "level": np.ones(keys.size, np.int8),
                                 "turn": np.repeat(np.asarray(turn_i, np.int32)[docs], nb)}, schema=_band_schema()))
    return pa.concat_tables(out) if out else _band_schema().empty_table()


def _runs(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(start, length) of each run of equal values in a sorted array."""
    if len(keys) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    starts = np.flatnonzero(np.concatenate(([True], keys[1:] != keys[:-1])))
    return starts, np.diff(np.append(starts, len(keys)))


def bucket_candidates(block, p: Params):
    """Step 2, on a block holding whole buckets: candidates (src -> target k) in step 3's
    schema. Level 1: every pair of a bucket of at most ALL_PAIRS_BUCKET dialogues, else each
    member to the STAR_TARGETS lowest. Level 2: in a bucket whose replies follow more than
    reply_contexts distinct contexts, each member to the lowest member (that one to the next)."""
    import pyarrow as pa

    block = block.sort_by([("bkey", "ascending"), ("k", "ascending")])
    starts, lengths = _runs(block.column("bkey").to_numpy())
    levels = block.column("level").to_numpy()
    big = lengths >= 2
    big &= (levels[starts] == 0) | (lengths > p.reply_contexts)
    cols: dict[str, list] = {"k": [], "level": [], "src": [], "a_turn": [], "b_turn": [], "ctxn": []}

    def add(target, src, level, a_turn, b_turn, ctxn):
        n = len(src)
        cols["k"].append(np.broadcast_to(np.asarray(target, np.uint64), n))  # a scalar or one per src
        cols["src"].append(np.asarray(src, np.uint64))
        cols["level"].append(np.full(n, level, np.int8))
        cols["a_turn"].append(np.broadcast_to(np.asarray(a_turn, np.int32), n))
        cols["b_turn"].append(np.broadcast_to(np.asarray(b_turn, np.int32), n))
        cols["ctxn"].append(np.full(n, ctxn, np.int32))

    if big.any():
        k = block.column("k").to_numpy()
        ctx = block.column("ctx").to_numpy()
        turn = block.column("turn").to_numpy()
        # level 1, small buckets (nearly all of them): every pair, vectorised per bucket size
        small = big & (levels[starts] == 0) & (lengths <= ALL_PAIRS_BUCKET)
        for m in np.unique(lengths[small]):
            at = starts[small & (lengths == m)]
            for i in range(m - 1):
                for j in range(i + 1, m):
                    src, tgt = k[at + j], k[at + i]
                    keep = src != tgt  # the same id twice (an exact copy) is one dialogue
                    if keep.any():
                        add(tgt[keep], src[keep], 0, -1, -1, 0)
        for s, n in zip(starts[big & ~small], lengths[big & ~small]):
            ks = k[s:s + n]
            if levels[s] == 0:
                uniq = np.unique(ks)  # the same id twice (an exact copy) is one dialogue here
                targets = uniq if len(uniq) <= ALL_PAIRS_BUCKET else uniq[:STAR_TARGETS]
                for ti in range(min(len(targets), len(uniq) - 1)):
                    add(uniq[ti], uniq[ti + 1:], 0, -1, -1, 0)
                continue
            distinct = len(np.unique(ctx[s:s + n]))
            if distinct <= p.reply_contexts:
                continue
            ts = turn[s:s + n]
            others = ks != ks[0]
            if not others.any():
                continue
            nxt = int(np.argmax(others))  # the lowest member other than the lowest
            add(np.where(others, ks[0], ks[nxt]), ks, 1, ts, np.where(others, ts[0], ts[nxt]), distinct)
    if not cols["k"]:
        return _target_schema().empty_table()
    arrays = {name: np.concatenate(v) for name, v in cols.items()}
    total = len(arrays["k"])
    return pa.table({**arrays, "id": pa.nulls(total, pa.string()), "turns": pa.nulls(total, pa.list_(pa.string()))},
                    schema=_target_schema())


def text_rows(batch):
    """Step 3's text side: every dialogue's id hash, id and turns."""
    import pyarrow as pa

    n = batch.num_rows
    return pa.table({
        "k": id_hash(batch.column("id").to_pylist()), "level": np.full(n, -1, np.int8), "src": np.zeros(n, np.uint64),
        "a_turn": np.full(n, -1, np.int32), "b_turn": np.full(n, -1, np.int32), "ctxn": np.zeros(n, np.int32),
        "id": batch.column("id").cast(pa.string()), "turns": batch.column("turns").cast(pa.list_(pa.string())),
    }, schema=_target_schema())


def attach_targets(block, schema):
    """Step 3, on a block holding each target's text with the candidates aimed at it: each
    candidate (deduplicated: one pair comes from several bands) gets the target's id and
    text, as step 4 rows keyed by the candidate's own id hash."""
    import pyarrow as pa

    out_schema = _step4_schema(schema)
    level = block.column("level").to_numpy()
    cand = block.filter(pa.array(level >= 0))
    if cand.num_rows == 0:
        return out_schema.empty_table()
    text = block.filter(pa.array(level < 0))
    cand = cand.group_by(["k", "src", "level", "a_turn", "b_turn"], use_threads=False).aggregate([("ctxn", "max")])
    text_k = text.column("k").to_numpy()
    order = np.argsort(text_k, kind="stable")
    text_k = text_k[order]
    ck = cand.column("k").to_numpy()
    pos = np.searchsorted(text_k, ck)
    pos = np.minimum(pos, max(len(text_k) - 1, 0))
    found = (text_k[pos] == ck) if len(text_k) else np.zeros(len(ck), bool)
    rows = order[pos[found]] if len(text_k) else np.zeros(0, np.int64)
    cand = cand.filter(pa.array(found))
    ids = text.column("id").take(pa.array(rows)).to_pylist()
    turns = text.column("turns").take(pa.array(rows)).to_pylist()
    levels = cand.column("level").to_numpy()
    b_turn = cand.column("b_turn").to_numpy()
    b_text = [t if lv == 0 else [t[bt]] if 0 <= bt < len(t) else [] for t, lv, bt in zip(turns, levels, b_turn)]
    n = cand.num_rows
    data = {f.name: pa.nulls(n, f.type) for f in schema}
    data.update({_K: cand.column("src"), "_nd_level": cand.column("level"), "_nd_a_turn": cand.column("a_turn"),
                 "_nd_ctxn": cand.column("ctxn_max").cast(pa.int32()), "_nd_b_k": cand.column("k"),
                 "_nd_b_id": pa.array(ids, pa.string()), "_nd_b_text": pa.array(b_text, pa.list_(pa.string()))})
    return pa.table(data, schema=out_schema)


def dialogue_rows(batch, schema):
    """Step 4's dialogue side: the rows as they are, with their id hash and level -1."""
    import pyarrow as pa

    n = batch.num_rows
    batch = batch.select(schema.names).cast(schema)
    data = {name: batch.column(name) for name in schema.names}
    data[_K] = pa.array(id_hash(batch.column("id").to_pylist()), pa.uint64())
    for f in _result_fields():
        data[f.name] = pa.array(np.full(n, -1, np.int8)) if f.name == "_nd_level" else pa.nulls(n, f.type)
    return pa.table(data, schema=_step4_schema(schema))


def decide(block, p: Params):
    """Step 4, on a block holding each dialogue with the candidates aimed at it: the exact
    n-gram Jaccard similarity of each candidate; a dialogue goes when one reaches the
    threshold (level 1 before level 2; the lowest target id hash wins)."""
    import pyarrow as pa

    level = block.column("_nd_level").to_numpy()
    rows = block.filter(pa.array(level < 0))
    order = [(_K, "ascending")] + ([("source", "ascending")] if "source" in rows.column_names else [])
    rows = rows.sort_by(order)
    fk = rows.column(_K).to_numpy()
    rows = rows.drop_columns([_K] + list(RESULT_COLUMNS))
    cand = block.filter(pa.array(level >= 0)).sort_by([(_K, "ascending"), ("_nd_level", "ascending"),
                                                       ("_nd_b_k", "ascending")])
    n = rows.num_rows
    reason, of, of_turns = [""] * n, [""] * n, [None] * n
    sim = np.zeros(n, np.float32)
    contexts = np.zeros(n, np.int32)
    ids = rows.column("id").to_pylist()
    if n > 1 and p.dialogues:  # the same id twice (no exact dedup before): later copies go
        turns_all = None
        for i in np.flatnonzero(fk[1:] == fk[:-1]) + 1:
            first = int(np.searchsorted(fk, fk[i]))
            if turns_all is None:
                turns_all = rows.column("turns")
            reason[i], of[i], sim[i] = NEAR_DUPLICATE, ids[first], 1.0
            of_turns[i] = turns_all[first].as_py()
    if cand.num_rows and n:
        ck = cand.column(_K).to_numpy()
        starts, lengths = _runs(ck)
        c_level = cand.column("_nd_level").to_numpy()
        c_turn = cand.column("_nd_a_turn").to_numpy()
        c_ctxn = cand.column("_nd_ctxn").to_numpy()
        c_id = cand.column("_nd_b_id").to_pylist()
        c_text = cand.column("_nd_b_text").to_pylist()
        turns_col = rows.column("turns")
        at = np.searchsorted(fk, ck[starts])
        for s, m, i in zip(starts, lengths, at):
            if i >= n or fk[i] != ck[s] or reason[i]:
                continue
            turns = [normalize_text(t) for t in (turns_col[int(i)].as_py() or [])]
            whole = None
            for c in range(s, s + m):
                if c_level[c] == 0:
                    if whole is None:
                        whole = ngrams(turns, p.ngram, normalized=True)
                    j = jaccard(whole, ngrams(c_text[c], p.ngram))
                else:
                    t = int(c_turn[c])
                    if not 0 <= t < len(turns) or not c_text[c]:
                        continue
                    j = jaccard(ngrams([turns[t]], p.ngram, normalized=True), ngrams(c_text[c][:1], p.ngram))
                if j >= p.threshold:  # sorted: level 1 first, then the lowest target
                    reason[i], of[i], sim[i], of_turns[i] = REASONS[int(c_level[c])], c_id[c], j, c_text[c]
                    contexts[i] = c_ctxn[c] if c_level[c] else 0
                    break
    return rows.append_column("_nd_reason", pa.array(reason, pa.string())) \
        .append_column("_nd_of", pa.array(of, pa.string())) \
        .append_column("_nd_sim", pa.array(sim, pa.float32())) \
        .append_column("_nd_contexts", pa.array(contexts, pa.int32())) \
        .append_column("_nd_of_turns", pa.array(of_turns, pa.list_(pa.string())))


def _kept_rows(batch):
    import pyarrow.compute as pc

    return batch.filter(pc.equal(batch.column("_nd_reason"), "")).drop_columns(list(OUT_COLUMNS))


def _removed_rows(batch):
    """Removed rows with `duplicate_of` (the id they near-duplicate) and `near_dup_reason`."""
    import pyarrow.compute as pc

    out = batch.filter(pc.not_equal(batch.column("_nd_reason"), ""))
    out = out.append_column("duplicate_of", out.column("_nd_of")).append_column("near_dup_reason", out.column("_nd_reason"))
    return out.drop_columns(list(OUT_COLUMNS))


def _count_reasons(batch):
    import pyarrow.compute as pc

    vc = pc.value_counts(batch.column("_nd_reason"))
    return {"reason": vc.field("values").to_pylist(), "n": vc.field("counts").to_pylist()}


def _example_rows(batch, reason: str):
    import pyarrow.compute as pc

    out = batch.filter(pc.equal(batch.column("_nd_reason"), reason))
    return out.select(["id", "turns", "_nd_of", "_nd_sim", "_nd_contexts", "_nd_of_turns"])


@dataclass
class NearDupResult:
    """kept: the dialogues that stay (input columns). removed: the others, with `duplicate_of`
    and `near_dup_reason` (NEAR_DUPLICATE or GENERIC_REPLY). stats(): per level kept and
    removed counts and up to `examples` example clusters (a few rows read, never all)."""

    kept: Any
    removed: Any
    tagged: Any = None
    examples: int = 3
    levels: dict = field(default_factory=dict)

    def stats(self) -> dict[str, Any]:
        if self.tagged is None:
            return {"dialogues": {"enabled": False}, "replies": {"enabled": False}}
        counts: dict[str, int] = {}
        for row in self.tagged.map_batches(_count_reasons, batch_format="pyarrow").take_all():
            counts[row["reason"]] = counts.get(row["reason"], 0) + int(row["n"])
        total = sum(counts.values())
        out: dict[str, Any] = {}
        remaining = total
        for reason, level in LEVELS.items():
            removed = counts.get(reason, 0)
            entry: dict[str, Any] = {"enabled": self.levels.get(level, False), "checked": remaining,
                                     "kept": remaining - removed, "removed": removed}
            if removed and self.examples:
                entry["examples"] = self._examples(reason)
            out[level] = entry
            remaining -= removed
        return out

    def _examples(self, reason: str) -> list[dict]:
        """Up to `examples` clusters among the first removed rows: level 1 {"kept": {id, turns},
        "removed": [{id, turns, similarity}]}, level 2 {"reply", "contexts", "like" (the id
        whose reply it repeats), "removed": [...]}."""
        rows = (self.tagged.map_batches(_example_rows, fn_kwargs={"reason": reason}, batch_format="pyarrow")
                .limit(20 * self.examples).take_all())
        clusters: dict[str, dict] = {}
        for r in rows:
            of_turns = list(r["_nd_of_turns"] if r["_nd_of_turns"] is not None else [])
            if reason == GENERIC_REPLY:
                reply = of_turns[0] if of_turns else ""
                c = clusters.setdefault(normalize_text(reply), {"reply": reply, "contexts": 0, "like": r["_nd_of"],
                                                                "removed": []})
                c["contexts"] = max(c["contexts"], int(r["_nd_contexts"]))
            else:
                c = clusters.setdefault(r["_nd_of"], {"kept": {"id": r["_nd_of"], "turns": of_turns}, "removed": []})
            if len(c["removed"]) < 3:
                c["removed"].append({"id": r["id"], "turns": list(r["turns"]),
                                     "similarity": round(float(r["_nd_sim"]), 3)})
        return sorted(clusters.values(), key=lambda c: -len(c["removed"]))[: self.examples]


def near_dedup(ds, cfg, num_partitions: int | None = None, scratch: str | None = None) -> NearDupResult:
    """Near-duplicate removal at both levels (see the module docstring); `cfg` is a
    NearDupConfig (or Params). Three steps read the input (it should be cheap to read again:
    a Parquet read, or a map over a materialised dataset, as preprocess hands it). The tagged
    result is computed once, because kept, removed and the statistics read it: written to
    the Parquet folder `scratch` when given (local or cloud; the caller removes it), else
    materialised in the object store. A materialised result holds the whole corpus in the
    store's shared memory, so that memory grows with the input (bench/dedup.py --growth);
    written out, the stage's memory is what its bounded shuffle partitions need."""
    p = cfg if isinstance(cfg, Params) else Params.of(cfg)
    examples = getattr(cfg, "examples", 3)
    levels = {"dialogues": p.dialogues, "replies": p.replies}
    if not (p.dialogues or p.replies):
        return NearDupResult(kept=ds, removed=ds.limit(0), examples=examples, levels=levels)
    schema = ds.schema().base_schema
    bands = ds.map_batches(band_rows, fn_kwargs={"p": p}, batch_format="pyarrow")
    cands = colocate(bands, "bkey", num_partitions).map_batches(
        bucket_candidates, fn_kwargs={"p": p}, batch_size=None, batch_format="pyarrow")
    texts = ds.map_batches(text_rows, batch_format="pyarrow")
    attached = colocate(texts.union(cands), "k", num_partitions).map_batches(
        attach_targets, fn_kwargs={"schema": schema}, batch_size=None, batch_format="pyarrow")
    rows = ds.map_batches(dialogue_rows, fn_kwargs={"schema": schema}, batch_format="pyarrow")
    tagged = colocate(rows.union(attached), _K, num_partitions).map_batches(
        decide, fn_kwargs={"p": p}, batch_size=None, batch_format="pyarrow")
    if scratch:
        import ray

        tagged.write_parquet(scratch)
        tagged = ray.data.read_parquet(scratch)
    else:
        tagged = tagged.materialize()
    kept = tagged.map_batches(_kept_rows, batch_format="pyarrow")
    removed = tagged.map_batches(_removed_rows, batch_format="pyarrow")
    return NearDupResult(kept=kept, removed=removed, tagged=tagged, examples=examples, levels=levels)
