"""jieba word segmentation as a Ray Data stage: one dictionary load per actor.

`Segmenter` adds `words` (per dialogue, one list of words per turn) and, with a stopword
list, `words_nostop` (for keyword statistics only). The `turns` text is never changed:
a generative model has to learn to write 的/了/是.

Backends. "jieba" is jieba 0.42's own `Tokenizer`. "jieba_fast" keeps that Tokenizer (its
dictionary, user dictionaries and its Python HMM for unknown words) and only swaps the
prefix-DAG + best-route search for jieba_fast's C routine (`_get_DAG_and_calc`), which
returns the same route. jieba_fast's own Tokenizer is NOT used: its C HMM (viterbi) splits
runs of characters missing from the HMM tables differently (rare/traditional characters:
59% of random dictionary-word texts with such characters differed), so its output is not
jieba's. "auto" uses the hybrid when jieba_fast is importable AND a self-check on
`_PROBE_TEXTS` gives exactly jieba's words; otherwise plain jieba. The full check over a
large generated corpus is `tests/test_segment.py::test_fast_backend_identical_on_large_corpus`
and `bench/preprocess.py`.
"""

from __future__ import annotations

import functools
import logging
import unicodedata
from importlib import resources
from typing import Any

from zhchat.config import SegmentConfig

from .clean import _column, as_turn_lists, with_columns

log = logging.getLogger(__name__)

# Rare characters (missing from the HMM tables), user-dictionary-like names, numbers, Latin
# and punctuation: where a different segmenter would show.
_PROBE_TEXTS = [
    "我来到北京清华大学", "他来到了网易杭研大厦", "小明硕士毕业于中国科学院计算所，后在日本京都大学深造",
    "匮漤轱谲撞人案他寨外扭打几只鈫鬋惏僧徒他", "諾囗奿愤勲<电话>", "郊氤榋吗相片风炉他镍氢电池退汞效率",
    "及靴兪大武耓", "柳湘兰链金术钹謎花纹路解除权了鸈严鱒购abc昆明城晴", "iPhone 15 Pro 的价格是 7999 元！",
    "永和服装饰品有限公司", "结婚的和尚未结婚的", "今天天气不错，我们去公园散步吧~", "😀 好的 ok 3.14",
]


def load_stopwords(spec: str | None) -> frozenset[str]:
    """None -> empty; "default" -> the bundled zhchat/data/stopwords.txt; else a file path
    (UTF-8, one word per line, '#' starts a comment)."""
    if not spec:
        return frozenset()
    if spec == "default":
        text = resources.files("zhchat").joinpath("data/stopwords.txt").read_text(encoding="utf-8")
    else:
        try:
            with open(spec, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise ValueError(f"segment.stopwords: cannot read stopword file {spec!r}: {e}") from e
    return frozenset(w for line in text.splitlines() if (w := line.split("#", 1)[0].strip()))


def _jieba_tokenizer():
    import jieba

    jieba.setLogLevel(logging.WARNING)
    return jieba.Tokenizer()


def _fast_tokenizer():
    """jieba's Tokenizer with the DAG + route step done in jieba_fast's C code."""
    import jieba
    from _jieba_fast_functions_py3 import _get_DAG_and_calc  # the C extension jieba_fast installs

    jieba.setLogLevel(logging.WARNING)

    class FastRouteTokenizer(jieba.Tokenizer):
        # jieba's __cut_DAG calls get_DAG then calc(sentence, DAG, route) and reads route[x][1]
        # (the end of the best word starting at x); the C routine builds the DAG itself.
        def get_DAG(self, sentence):
            self.check_initialized()
            return None

        def calc(self, sentence, DAG, route):
            ends: list[int] = []
            _get_DAG_and_calc(self.FREQ, sentence, ends, float(self.total))
            route.update(zip(range(len(ends)), zip(ends, ends)))

        def cut(self, sentence, cut_all=False, HMM=True, use_paddle=False):
            if cut_all:
                raise NotImplementedError("cut_all needs the DAG; use the 'jieba' backend")
            return super().cut(sentence, cut_all=False, HMM=HMM)

    return FastRouteTokenizer()


def _route_matches_python(tok) -> bool:
    """The C route equals jieba's Python get_DAG + calc on the probe texts, with this
    tokenizer's dictionary (user words included). Everything else is jieba's own code, so
    equal routes mean equal words; no second dictionary has to be loaded."""
    import jieba

    for text in _PROBE_TEXTS:
        fast: dict = {}
        tok.calc(text, None, fast)
        slow: dict = {}
        jieba.Tokenizer.calc(tok, text, jieba.Tokenizer.get_DAG(tok, text), slow)
        if any(fast[i][1] != slow[i][1] for i in range(len(text))):
            return False
    return True


def make_tokenizer(cfg: SegmentConfig) -> tuple[Any, str]:
    """(initialised tokenizer with user dictionaries loaded, backend actually used)."""
    backend = cfg.backend
    tok, used = None, "jieba"
    if backend in ("auto", "jieba_fast"):
        try:
            tok = _fast_tokenizer()
            used = "jieba_fast"
        except ImportError as e:
            if backend == "jieba_fast":
                raise ValueError(f"segment.backend is 'jieba_fast' but it is not installed ({e}); "
                                 "pip install jieba_fast, or use 'auto'/'jieba'") from e
    if tok is None:
        tok = _jieba_tokenizer()
    tok.initialize()
    for path in cfg.user_dicts:
        try:
            tok.load_userdict(path)
        except Exception as e:  # jieba raises bare ValueError/UnicodeDecodeError with no file name
            raise ValueError(f"segment.user_dicts: cannot load jieba user dictionary {path!r}: {e}") from e
    if used == "jieba_fast" and not _route_matches_python(tok):
        if backend == "jieba_fast":
            raise ValueError("segment.backend 'jieba_fast' segments the probe texts differently from jieba "
                             "with this jieba_fast build; use 'jieba' or 'auto'")
        log.warning("jieba_fast's output differs from jieba's on the probe texts; using plain jieba")
        return make_tokenizer(cfg.model_copy(update={"backend": "jieba"}))
    return tok, used


def _is_noise(word: str) -> bool:
    """White space and pure punctuation/symbol tokens: no use to word statistics."""
    return all(ch.isspace() or unicodedata.category(ch)[0] in "PSZ" for ch in word)


# Chat corpora repeat their short turns a lot (好的, 哈哈, 谢谢, 在吗): those are segmented
# once per actor and then looked up. The words are a pure function of the text, so the
# output is the same; long turns rarely repeat and would only fill the cache.
CACHE_TURN_CHARS = 32


class Segmenter:
    """Callable class for `map_batches`: the dictionary is loaded once per actor, here.
    `cache_size` short turns' words are kept in an LRU cache (0: none)."""

    def __init__(self, cfg: SegmentConfig | dict | None = None, cache_size: int = 32768):
        self.cfg = cfg if isinstance(cfg, SegmentConfig) else SegmentConfig.model_validate(cfg or {})
        self.tokenizer, self.backend = make_tokenizer(self.cfg)
        self.stopwords = load_stopwords(self.cfg.stopwords)
        self._cached = functools.lru_cache(maxsize=cache_size)(self._cut) if cache_size else None

    def _cut(self, text: str) -> list[str]:
        return self.tokenizer.lcut(text, HMM=self.cfg.hmm)

    def words(self, text: str) -> list[str]:
        if self._cached is not None and len(text) <= CACHE_TURN_CHARS:
            return list(self._cached(text))  # a copy: callers may change their list
        return self._cut(text)

    def __call__(self, batch: Any) -> Any:
        turns = as_turn_lists(_column(batch, "turns"))
        words = [[self.words(t) for t in dialogue] for dialogue in turns]
        new: dict[str, list] = {"words": words}
        if self.cfg.stopwords:
            stop = self.stopwords
            new["words_nostop"] = [[[w for w in ws if w not in stop and not _is_noise(w)] for ws in d] for d in words]
        if hasattr(batch, "column_names"):  # pyarrow: `turns` is already list<string>
            import pyarrow as pa

            words_type = pa.list_(pa.list_(pa.string()))
            return with_columns(batch, new, types={"words": words_type, "words_nostop": words_type})
        # numpy batches hold turns as object arrays: handing those back would make Ray store
        # them as pickled objects instead of list<string>
        return with_columns(batch, {"turns": turns, **new})


def plan_actors(cfg: SegmentConfig, cpus: int) -> tuple[int, float]:
    """(actors, CPUs each). One actor per CPU (jieba is single-threaded and CPU-bound), but
    their CPU requests add up to at most cpus - 1 so a read or write task can always be
    scheduled: actors holding every CPU starve the write operator and the stage stalls."""
    actors = cfg.actors or max(1, cpus)
    budget = cpus - 1 if cpus >= 2 else cpus / 2
    return actors, min(1.0, budget / actors)


def segment_dataset(ds, cfg: SegmentConfig, batch_size: int = 256, rows_per_block: int = 2048):
    """`ds` with `words` (and `words_nostop`) added by a pool of Segmenter actors.

    An actor works on whole blocks, so a few big blocks (Ray reads a handful of small files
    as one block) would keep all but one actor idle: blocks are first cut to at most
    `rows_per_block` dialogues by Ray's streaming repartition (no shuffle, no barrier, so
    the stage still streams)."""
    if not cfg.enabled:
        return ds
    import ray

    from zhchat.runtime import cluster_cpus

    actors, cpus_each = plan_actors(cfg, cluster_cpus())
    return ds.repartition(target_num_rows_per_block=rows_per_block).map_batches(
        Segmenter,
        fn_constructor_kwargs={"cfg": cfg},
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus_each,
        batch_size=batch_size,
        batch_format="pyarrow",
    )
