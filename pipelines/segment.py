"""jieba word segmentation as a Ray Data stage: one dictionary load per actor.

`Segmenter` adds `words` (per dialogue, one list of words per turn) and, with a stopword
list, `words_nostop` (for keyword statistics only). The `turns` text is never changed:
a generative model has to learn to write 的/了/是.

The words are exactly jieba 0.42's (`jieba.lcut`, accurate mode, HMM for unknown words),
found about twice as fast by `WordCutter`, a jieba.Tokenizer (same dictionary, user
dictionaries and HMM) whose `lcut` restates jieba's `cut` + `__cut_DAG` + `get_DAG` +
`calc` as one pass that builds a list instead of a chain of generators and dicts, and
remembers the words of recent blocks (the runs of Chinese and alphanumerics between
punctuation) and the HMM's split of recent runs of unknown characters: both are pure
functions of their text, and chat repeats its clauses and names a lot. jieba_fast is not used: its
C route keeps the first of equal-scoring words where jieba keeps the last (哈哈哈哈哈哈哈
comes out differently) and its C HMM splits characters missing from the HMM tables
differently. `make_tokenizer` checks the cutter against jieba's own code on `_PROBE_TEXTS`
and uses jieba's code if they ever differ; the full check over a large generated corpus is
`tests/test_segment.py::test_cutter_identical_to_jieba_on_large_corpus` and `bench/preprocess.py`.
"""

from __future__ import annotations

import functools
import logging
import math
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
    "", "  \t\n", "PM2.5超标了!!!", "哈哈哈哈哈哈哈哈", "C++和C#都会，3.5%的人",
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


def _word_cutter_class():
    """WordCutter, built on jieba when first needed (importing jieba is slow, and the
    driver does not need it)."""
    import jieba
    from jieba import finalseg

    re_han, re_skip = jieba.re_han_default, jieba.re_skip_default

    class WordCutter(jieba.Tokenizer):
        """jieba.Tokenizer whose accurate-mode HMM `lcut` is the same algorithm in one pass."""

        use_jieba_code = False  # set when the probe check finds a difference: plain jieba then

        def __init__(self, block_cache: int = 1 << 16, hmm_cache: int = 1 << 16):
            super().__init__()
            # Both are pure functions of their text (the dictionary is loaded before the first
            # cut): chat repeats its clauses (好的 / 哈哈 / 你呢) and its unknown names a lot.
            # ~25 MB for the block cache when full.
            self._block = functools.lru_cache(maxsize=block_cache)(self._cut_block)
            self._hmm = functools.lru_cache(maxsize=hmm_cache)(lambda run: tuple(finalseg.cut(run)))

        def cache_hit_rates(self) -> dict[str, float]:
            """Share of blocks and of unknown-character runs that were cut before."""
            rates = {}
            for name, cache in (("blocks", self._block), ("hmm_runs", self._hmm)):
                info = cache.cache_info()
                rates[name] = info.hits / max(1, info.hits + info.misses)
            return rates

        def route_ends(self, block: str) -> list[int]:
            """ends[x]: the last index of the best-route word that starts at x.

            jieba's get_DAG + calc fused into one right-to-left pass: the words starting at
            x are the prefixes of block[x:] with a non-zero count (FREQ holds every prefix
            of every word, with count 0 for those that are not words themselves); a
            word's score is log(count) - log(total) plus the best score after it, summed
            in jieba's order so that the floats are bit-identical, and of equal scores the
            longest word wins, as jieba's max over (score, x) tuples picks it."""
            n, get, ln = len(block), self.FREQ.get, math.log
            logtotal = ln(self.total)
            best_after = [0.0] * (n + 1)
            ends = [0] * n
            for x in range(n - 1, -1, -1):
                best, end = None, x
                y, frag = x, block[x]
                while y < n and (count := get(frag)) is not None:
                    if count:
                        score = ln(count) - logtotal + best_after[y + 1]
                        if best is None or score >= best:
                            best, end = score, y
                    y += 1
                    frag = block[x:y + 1]
                if best is None:  # no word starts here: the character alone, count 1
                    best = ln(1) - logtotal + best_after[x + 1]
                best_after[x], ends[x] = best, end
            return ends

        def _unknown_run(self, out: list, run: str) -> None:
            # __cut_DAG: one character alone; a run that is itself a dictionary word is
            # kept as characters; any other run goes to the HMM
            if len(run) == 1:
                out.append(run)
            elif not self.FREQ.get(run):
                out.extend(self._hmm(run))
            else:
                out.extend(run)

        def _cut_block(self, block: str) -> tuple[str, ...]:
            """jieba's __cut_DAG: words of the best route; runs of single characters between
            them are unknown words for the HMM."""
            out: list[str] = []
            ends = self.route_ends(block)
            x, n, run = 0, len(block), ""
            while x < n:
                y = ends[x] + 1
                if y - x == 1:
                    run += block[x]
                else:
                    if run:
                        self._unknown_run(out, run)
                        run = ""
                    out.append(block[x:y])
                x = y
            if run:
                self._unknown_run(out, run)
            return tuple(out)

        def lcut(self, sentence, cut_all=False, HMM=True, use_paddle=False):
            if cut_all or not HMM or use_paddle or self.use_jieba_code or not isinstance(sentence, str):
                return super().lcut(sentence, cut_all=cut_all, HMM=HMM, use_paddle=use_paddle)
            if not self.initialized:
                self.initialize()
            # jieba's Tokenizer.cut: Chinese/alphanumeric blocks are cut by route + HMM;
            # in the rest, alphanumeric runs stay whole and everything else is one character each
            out: list[str] = []
            for blk in re_han.split(sentence):
                if not blk:
                    continue
                if re_han.match(blk):
                    out.extend(self._block(blk))
                else:
                    for x in re_skip.split(blk):
                        if re_skip.match(x):
                            out.append(x)
                        else:
                            out.extend(x)
            return out

    return WordCutter


def _same_as_jieba(tok) -> bool:
    """The cutter's words equal jieba's own Tokenizer code (cut, get_DAG, calc) on the probe
    texts, with this tokenizer's dictionary (user words included); no second dictionary has
    to be loaded."""
    import jieba

    return all(tok.lcut(t) == jieba.Tokenizer.lcut(tok, t) for t in _PROBE_TEXTS)


def make_tokenizer(cfg: SegmentConfig):
    """An initialised WordCutter with the user dictionaries loaded."""
    import jieba

    jieba.setLogLevel(logging.WARNING)
    tok = _word_cutter_class()()
    tok.initialize()
    for path in cfg.user_dicts:
        try:
            tok.load_userdict(path)
        except Exception as e:  # jieba raises bare ValueError/UnicodeDecodeError with no file name
            raise ValueError(f"segment.user_dicts: cannot load jieba user dictionary {path!r}: {e}") from e
    if not _same_as_jieba(tok):
        log.warning("zhchat's word cutter differs from this jieba's own code on the probe texts; using jieba's code")
        tok.use_jieba_code = True
    return tok


def _is_noise(word: str) -> bool:
    """White space and pure punctuation/symbol tokens: no use to word statistics."""
    return all(ch.isspace() or unicodedata.category(ch)[0] in "PSZ" for ch in word)


class Segmenter:
    """Callable class for `map_batches`: the dictionary is loaded once per actor, here."""

    def __init__(self, cfg: SegmentConfig | dict | None = None):
        self.cfg = cfg if isinstance(cfg, SegmentConfig) else SegmentConfig.model_validate(cfg or {})
        self.tokenizer = make_tokenizer(self.cfg)
        self.stopwords = load_stopwords(self.cfg.stopwords)

    def words(self, text: str) -> list[str]:
        return self.tokenizer.lcut(text, HMM=self.cfg.hmm)

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


def segment_dataset(ds, cfg: SegmentConfig, batch_size: int = 256):
    """`ds` with `words` (and `words_nostop`) added by a pool of Segmenter actors.

    An actor works on whole blocks: a dataset of a few big blocks (a shuffle's output) keeps
    all but one actor idle, so such a dataset should be cut into blocks of a few thousand
    rows first (preprocess does it after dedup, fused into the map before it). A parquet
    read already gives such blocks: it splits its files' rows into ~200 blocks or more."""
    if not cfg.enabled:
        return ds
    import ray

    from zhchat.runtime import cluster_cpus

    actors, cpus_each = plan_actors(cfg, cluster_cpus())
    return ds.map_batches(
        Segmenter,
        fn_constructor_kwargs={"cfg": cfg},
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus_each,
        batch_size=batch_size,
        batch_format="pyarrow",
    )
