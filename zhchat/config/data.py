"""Config for the data stages: ingest, clean, segment, split, tokenizer, dialogue format."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from .base import Section, existing_path

FORMATS = (
    "auto", "lccc", "lccc_jsonl", "lccc_tsv", "stc", "douban", "chitchat",
    "sharegpt", "openai", "text_lines", "text_file",
)
Format = Literal[
    "auto", "lccc", "lccc_jsonl", "lccc_tsv", "stc", "douban", "chitchat",
    "sharegpt", "openai", "text_lines", "text_file",
]


class IngestConfig(Section):
    inputs: list[str] = Field(default_factory=list, description="Files or folders to import (gzip works)")
    format: Format = Field("auto", description="Input format; 'auto' detects it per file and says which")
    out: str | None = Field(None, description="Output folder (dialogues/ and quarantine/ Parquet)")
    chunk_mb: int = Field(32, ge=1, le=1024, description="Line-based files are parsed in chunks of about this size "
                          "(memory per parse task); gzip and whole-JSON files are one chunk each")

    @field_validator("inputs")
    @classmethod
    def _inputs_exist(cls, v: list[str]) -> list[str]:
        return [existing_path(p, "input") for p in v]


# Ordered regex -> replacement pairs (Python `re`), applied to every turn after NFKC,
# Weibo-noise removal, un-spacing and privacy scrubbing, before long runs of one character
# are cut. Laughter and filler variants collapse to one spelling so the model does not
# learn a hundred ways to write "ha"; each pattern only fires on a real run (3+ where the
# doubled form is ordinary text, e.g. 哈哈, 哇哇大哭) and never inside words (乐呵呵, 笑呵呵).
DEFAULT_RULES: list[tuple[str, str]] = [
    # laughter
    (r"(?<![乐笑傻憨喜])呵{2,}", "笑"),                 # 呵呵 / 呵呵呵… is a (dry) laugh
    (r"哈{3,}", "哈哈"),
    (r"(?i)(?<![a-z])(?:ha){2,}h?(?![a-z])", "哈哈"),   # haha, hahaha
    (r"(?i)(?<![a-z])h{3,}(?![a-z])", "哈哈"),          # hhhh (internet laughter)
    (r"(?<!\d)2333+(?!\d)", "哈哈"),                  # 2333…; a bare 233 is often a number
    (r"嘿{3,}", "嘿嘿"),
    (r"嘻{3,}", "嘻嘻"),
    (r"嘤{3,}", "嘤嘤"),
    (r"(?i)(?<![a-z])xswl(?![a-z])", "笑死我了"),
    # drawn-out interjections and fillers
    (r"嗯{2,}", "嗯"),
    (r"[额呃]{2,}", "呃"),
    (r"(?i)(?<![a-z])em{2,}(?![a-z])", "呃"),           # emmm
    (r"啊{2,}", "啊"),
    (r"哦{2,}", "哦"),
    (r"噢{2,}", "噢"),
    (r"哇{3,}", "哇"),
    (r"[唉哎]{3,}", "唉"),
    # punctuation runs keep their first character (full-width ，。！？～… survive NFKC)
    (r"([~～])[~～]+", r"\1"),
    (r"(?<=[^\x00-\x7f])\.{3,}|。{2,}|…{3,}", "……"),    # the Chinese ellipsis is ……; "wait..." stays
    (r"([!！])[!！]+", r"\1"),
    (r"([?？])[?？]+", r"\1"),
]


# Replies that say nothing on their own. Matched against the whole last turn after the text
# rules (so 哈哈哈哈 has become 哈哈 and 呵呵 笑) with punctuation, symbols, spaces and case
# ignored: "好的！" matches 好的, "好的，明天见" does not. The entries go through the same text
# rules first, so an entry written as 嗯嗯嗯 still matches.
DEFAULT_GENERIC_REPLIES: list[str] = [
    "哈哈", "哈", "嘿嘿", "嘻嘻", "笑", "呵呵", "嗯", "嗯嗯", "恩", "恩恩", "嗯呢", "哦", "哦哦", "噢", "喔",
    "啊", "呃", "额", "好", "好的", "好滴", "好吧", "好啊", "行", "可以", "是", "是的", "是啊", "对", "对啊",
    "对的", "ok", "okay", "收到", "知道了", "晕", "顶", "赞", "666", "233", "嗯好", "哈哈哈",
]
# Phrases of advertising and spam (matched after NFKC and case folding, on the raw turns
# before links and numbers are scrubbed); contact handles (QQ/微信/VX + a number or an id)
# and links next to a sales cue are recognised by pattern as well.
DEFAULT_AD_WORDS: list[str] = [
    "加微信", "加我微信", "添加微信", "微信同号", "加v信", "加vx", "加wx", "加qq", "加扣扣", "代购", "刷单",
    "兼职日结", "日赚", "招代理", "诚招代理", "免费领取", "私信领取", "扫码领", "扫码关注", "点击链接", "戳链接",
    "限时抢购", "秒杀价",
]


class QualityConfig(Section):
    """Dialogue-level quality rules (pipelines/clean.py). A dialogue that breaks one is removed
    and counted under the rule's name; each rule has a value that turns it off."""

    generic_replies: list[str] = Field(default_factory=lambda: list(DEFAULT_GENERIC_REPLIES),
                                       description="Dialogues whose reply is only one of these are removed ([]: off)")
    ads: bool = Field(True, description="Remove dialogues with ads or spam: contact handles, ad phrases, sales links")
    ad_words: list[str] = Field(default_factory=lambda: list(DEFAULT_AD_WORDS),
                                description="Ad and spam phrases for the ads rule")
    min_chinese_share: float | None = Field(0.5, ge=0, le=1, description="Remove dialogues where Chinese characters "
                                            "are less than this share of the words (a run of other letters is one word); None: off")
    max_repeated_turns: float | None = Field(0.5, gt=0, le=1, description="Remove dialogues where at least this share of "
                                             "the turns after the first repeat an earlier turn; None: off")
    max_length_ratio: float | None = Field(20.0, gt=1, description="Remove dialogues whose reply and the turn before "
                                           "it differ in length by more than this factor; None: off")


class SensitiveConfig(Section):
    """A user word list matched with Aho-Corasick after NFKC and case folding (zhchat.wordmatch)."""

    words: str | None = Field(None, description="Word list file: one word per line, # comments (None: off)")
    action: Literal["drop", "mask"] = Field("drop", description="drop: remove the dialogue (quarantined with the "
                                            "word); mask: replace each match with mask_char")
    mask_char: str = Field("*", min_length=1, max_length=1)

    @field_validator("words")
    @classmethod
    def _words_exist(cls, v: str | None) -> str | None:
        return None if v is None else existing_path(v, "sensitive word list")


class NearDupConfig(Section):
    """MinHash near-duplicate removal (pipelines/dedup.py) over character n-grams of the
    normalised text (NFKC, case folded, punctuation, symbols and spaces dropped), with LSH
    banding: `bands` bands of num_perm // bands rows. Candidates that share a band are
    checked with their exact n-gram Jaccard similarity against `threshold`."""

    dialogues: bool = Field(True, description="Level 1: remove dialogues that near-duplicate another one")
    replies: bool = Field(True, description="Level 2: remove dialogues whose reply near-duplicates replies "
                          "seen after more than reply_contexts distinct contexts")
    threshold: float = Field(0.7, gt=0, le=1, description="Jaccard similarity of the n-gram sets at or above "
                             "which two texts are near-duplicates")
    ngram: int = Field(3, ge=1, le=16, description="Character n-gram size (shorter turns are one n-gram)")
    num_perm: int = Field(64, ge=8, le=1024, description="MinHash permutations")
    bands: int = Field(16, ge=1, description="LSH bands; rows per band = num_perm // bands")
    reply_contexts: int = Field(10, ge=1, description="K: a reply whose near-duplicates follow more than K "
                                "distinct contexts (the turn before it) is generic")
    reply_turns: Literal["last", "all"] = Field("last", description="Which turns count as replies for level 2: "
                                                "the last one, or every turn after the first")
    examples: int = Field(3, ge=0, le=50, description="Example clusters per level in the report")

    @model_validator(mode="after")
    def _bands_fit(self):
        if self.bands > self.num_perm:
            raise ValueError(f"bands ({self.bands}) cannot exceed num_perm ({self.num_perm})")
        return self


class CleanConfig(Section):
    nfkc: bool = True
    undo_spacing: bool = Field(True, description="Join LCCC/Douban per-character or per-word spacing between CJK")
    strip_urls: bool = True
    strip_mentions: bool = True
    strip_topics: bool = True
    strip_reposts: bool = True
    emoji: Literal["keep", "remove"] = "keep"
    privacy: bool = Field(True, description="Replace phone, e-mail, ID-card and bank-card numbers with placeholders")
    rules: list[tuple[str, str]] = Field(default_factory=lambda: list(DEFAULT_RULES))
    max_repeat_chars: int = Field(4, ge=1, description="Longer runs of one character are cut to this length")
    min_turn_chars: int = Field(1, ge=0)
    max_turn_chars: int = Field(300, ge=1)
    min_turns: int = Field(1, ge=1, description="Dialogues with fewer turns after cleaning are removed")
    max_turns: int = Field(32, ge=1, description="Longer dialogues keep their last max_turns turns")
    dedup: Literal["none", "exact", "normalized"] = "normalized"
    near_dup: NearDupConfig = Field(default_factory=NearDupConfig)
    quality: QualityConfig = Field(default_factory=QualityConfig)
    sensitive: SensitiveConfig = Field(default_factory=SensitiveConfig)

    @field_validator("rules")
    @classmethod
    def _rules_compile(cls, v: list[tuple[str, str]]) -> list[tuple[str, str]]:
        import re

        for i, (pattern, _) in enumerate(v):
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"rules[{i}] pattern {pattern!r} is not a valid regex: {e}") from e
        return v


class SegmentConfig(Section):
    enabled: bool = True
    hmm: bool = True
    user_dicts: list[str] = Field(default_factory=list, description="jieba user dictionaries")
    stopwords: str | None = Field(None, description="Stopword file for the statistics-only column; 'default' uses the bundled list")
    actors: int | None = Field(None, ge=1, description="Segmenter actors (None: one per CPU)")

    @field_validator("user_dicts")
    @classmethod
    def _dicts_exist(cls, v: list[str]) -> list[str]:
        return [existing_path(p, "user dictionary") for p in v]


class SplitConfig(Section):
    validation: float = Field(0.05, ge=0, lt=1)
    test: float = Field(0.05, ge=0, lt=1)
    salt: str = Field("zhchat", description="Changing it reshuffles the split")

    @model_validator(mode="after")
    def _fractions(self):
        if self.validation + self.test >= 1:
            raise ValueError("validation + test must be below 1")
        return self


class TokenizerConfig(Section):
    pretrained: str | None = Field(None, description="Use this tokenizer (local path or hub id) instead of training one")
    vocab_size: int = Field(8000, ge=300, le=262144)
    min_frequency: int = Field(2, ge=1)


class FormatConfig(Section):
    """The dialogue layout shared by training and serving (see zhchat.dialogue)."""

    context_length: int = Field(256, ge=16, le=8192)
    loss_on: Literal["replies", "all"] = Field("replies", description="Loss on assistant replies only, or on every turn")


class PreprocessConfig(Section):
    input: str | None = Field(None, alias="in", description="Folder written by ingest or crawl")
    out: str | None = None
    clean: CleanConfig = Field(default_factory=CleanConfig)
    segment: SegmentConfig = Field(default_factory=SegmentConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    format: FormatConfig = Field(default_factory=FormatConfig)
    force: bool = Field(False, description="Redo the work even if OUT/manifest.json shows these inputs and config are done")

    model_config = Section.model_config | {"populate_by_name": True}

