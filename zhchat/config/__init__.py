"""One config schema for a whole run; every stage reads its own section.

The CLI, `ray job submit` and the Serve config all go through `load_config`, so a bad
key or value fails at load time with the field's dotted name and the reason.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError

from .base import Section, existing_path, is_uri
from .crawl import CrawlConfig, SelectorConfig
from .data import (
    CleanConfig, FormatConfig, IngestConfig, PreprocessConfig, SegmentConfig, SplitConfig,
    TokenizerConfig, FORMATS,
)
from .ray import RayConfig
from .serve import GenerationDefaults, ServeConfig
from .eval import EvalConfig
from .train import TrainConfig

__all__ = [
    "RunConfig", "ConfigError", "load_config", "check_stage_inputs", "Section", "existing_path", "is_uri",
    "RayConfig", "IngestConfig", "CrawlConfig", "SelectorConfig", "CleanConfig", "SegmentConfig",
    "SplitConfig", "TokenizerConfig", "FormatConfig", "PreprocessConfig", "TrainConfig",
    "EvalConfig", "ServeConfig", "GenerationDefaults", "FORMATS",
]


class RunConfig(Section):
    """A whole run. `workdir` is where stages put outputs whose path is not given."""

    workdir: str = Field("zhchat-run", description="Base folder (local path or cloud URI) for stage outputs")
    ray: RayConfig = Field(default_factory=RayConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    crawl: CrawlConfig = Field(default_factory=CrawlConfig)
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)

    def path(self, name: str) -> str:
        """Default output folder of a stage under workdir (e.g. path('ingest'))."""
        return f"{self.workdir.rstrip('/')}/{name}"

    def resolved(self) -> "RunConfig":
        """A copy with every unset stage path chained to the previous stage's output."""
        c = self.model_copy(deep=True)
        ingest_out = c.ingest.out or c.path("ingest")
        crawl_out = c.crawl.out or c.path("crawl")
        c.ingest.out = ingest_out
        c.crawl.out = crawl_out
        if c.preprocess.input is None:
            c.preprocess.input = crawl_out if c.crawl.seeds and not c.ingest.inputs else ingest_out
        c.preprocess.out = c.preprocess.out or c.path("data")
        c.train.data = c.train.data or c.preprocess.out
        c.train.out = c.train.out or c.path("train")
        c.eval.data = c.eval.data or c.preprocess.out
        c.eval.model = c.eval.model or c.train.out
        c.serve.model = c.serve.model or c.train.out
        return c


# Inputs a stage reads that an earlier stage may write: checked when that stage is run on
# its own (not at load time, since `zhchat run` creates them as it goes).
STAGE_INPUTS: dict[str, tuple[tuple[str, str], ...]] = {
    "preprocess": (("preprocess", "input"),),
    "train": (("train", "data"),),
    "eval": (("eval", "model"), ("eval", "data")),
    "serve": (("serve", "model"),),
    "chat": (("serve", "model"),),
}


def check_stage_inputs(cfg: "RunConfig", stage: str) -> None:
    """Fail before any work when a stage's input folder is missing, naming the field."""
    missing = []
    for section, field in STAGE_INPUTS.get(stage, ()):
        value = getattr(getattr(cfg, section), field)
        if value is not None and not is_uri(value) and not Path(value).expanduser().exists():
            key = "in" if field == "input" else field
            missing.append(f"  {section}.{key}: path does not exist (got {value!r})")
    if missing:
        raise ConfigError("invalid config:\n" + "\n".join(missing))


class ConfigError(ValueError):
    """A config that cannot be used; the message names every bad field and why."""


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "required key is missing"
        value = e.get("input")
        shown = "" if e["type"] in ("missing",) or isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"  {loc}: {msg}{shown}")
    return "\n".join(lines)


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a YAML config (optional), apply flag overrides (a nested dict), validate.

    Overrides with value None are ignored so that unset CLI flags keep the file's values.
    """
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        text = _read_config_text(str(path))
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top, got {type(loaded).__name__}")
        data = loaded or {}
        source = str(path)
    if overrides:
        data = _deep_merge(data, _drop_none(overrides))
        source += " + command-line flags"
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None


def _read_config_text(path: str) -> str:
    """A file path, or env://NAME for a config passed in an environment variable (how
    `zhchat submit` hands the config to a Ray job without writing into the project)."""
    if path.startswith("env://"):
        name = path[len("env://"):]
        if name not in os.environ:
            raise ConfigError(f"config variable {name} is not set")
        return os.environ[name]
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {path}")
    return p.read_text(encoding="utf-8")


def _drop_none(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            v = _drop_none(v)
            if v:
                out[k] = v
        elif v is not None:
            out[k] = v
    return out
