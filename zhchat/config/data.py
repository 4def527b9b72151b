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

