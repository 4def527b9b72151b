"""`zhchat run`: every stage in order, on whatever Ray cluster is reachable.

crawl (if seeds) → ingest (if inputs) → preprocess → train → eval → serve.

A stage whose outputs are complete for the same inputs and config is skipped: after a
stage succeeds its fingerprint (its config section plus the fingerprints of the stages it
reads from) is written under `WORKDIR/.stages/`; a rerun after a failure resumes at the
first stage whose fingerprint changed or is missing. Training resumes from its own
checkpoints on top of that.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from importlib import resources

from .config import RunConfig
from .report import say, summary_table
from .storage import read_text, write_text

# stage -> (config section, upstream stages whose output it reads)
PIPELINE: list[tuple[str, str, tuple[str, ...]]] = [
    ("crawl", "crawl", ()),
    ("ingest", "ingest", ()),
    ("preprocess", "preprocess", ("crawl", "ingest")),
    ("train", "train", ("preprocess",)),
    ("eval", "eval", ("train", "preprocess")),
]


def sample_files() -> list[str]:
    """The sample corpus that ships with the package (its README is not data)."""
    root = resources.files("zhchat") / "data" / "sample"
    return sorted(str(p) for p in root.iterdir() if p.is_file() and not p.name.endswith(".md"))


def embedded_default(cfg: RunConfig) -> RunConfig:
    """With no inputs and no crawl seeds: the bundled sample corpus."""
    if cfg.ingest.inputs or cfg.crawl.seeds:
        return cfg
    say("no ingest inputs or crawl seeds given: using the bundled sample corpus")
    data = cfg.model_dump(by_alias=True)
    data["ingest"]["inputs"] = sample_files()
    return RunConfig.model_validate(data).resolved()


def _fingerprint(cfg: RunConfig, stage: str, section: str, upstream: dict[str, str]) -> str:
    body = {"stage": stage, "config": getattr(cfg, section).model_dump(mode="json", by_alias=True),
            "upstream": upstream}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _enabled(cfg: RunConfig, stage: str) -> bool:
    if stage == "crawl":
        return bool(cfg.crawl.seeds)
    if stage == "ingest":
        return bool(cfg.ingest.inputs)
    return True


def _stage_args(stage: str) -> argparse.Namespace:
    """The argparse namespace a stage function expects when called from `run`."""
    from .cli import build_parser

    argv = {"ingest": ["ingest"], "crawl": ["crawl"], "preprocess": ["preprocess"], "train": ["train"],
            "eval": ["eval"], "serve": ["serve"]}[stage]
    return build_parser().parse_args(argv)


def run_all(cfg: RunConfig, args: argparse.Namespace) -> dict:
    from .cli import resolve_stage, stop_on_sigterm
    from .runtime import init_ray

    cfg = embedded_default(cfg)
    init_ray(cfg.ray)
    stop_on_sigterm()  # ray.init replaced our SIGTERM handler with its own
    marks = f"{cfg.workdir.rstrip('/')}/.stages"
    done: dict[str, str] = {}
    timings = []
    results: dict[str, dict] = {}
    for stage, section, upstream in PIPELINE:
        if not _enabled(cfg, stage):
            continue
        fp = _fingerprint(cfg, stage, section, {u: done[u] for u in upstream if u in done})
        mark = f"{marks}/{stage}.json"
        previous = read_text(mark)
        if previous and json.loads(previous).get("fingerprint") == fp:
            say(f"[bold]{stage}[/]: outputs are complete for these inputs and config — skipped")
            done[stage] = fp
            results[stage] = json.loads(previous).get("summary", {})
            timings.append((stage, "skipped", 0.0))
            continue
        say(f"[bold]── {stage} ──[/]")
        t0 = time.perf_counter()
        summary = resolve_stage(stage)(cfg, _stage_args(stage)) or {}
        elapsed = time.perf_counter() - t0
        write_text(mark, json.dumps({"fingerprint": fp, "summary": summary, "seconds": elapsed},
                                    ensure_ascii=False, default=str, indent=1))
        done[stage] = fp
        results[stage] = summary
        timings.append((stage, "ran", round(elapsed, 1)))
    summary_table("zhchat run", ["stage", "status", "seconds"], timings)
    _print_where(cfg, results)
    if not getattr(args, "no_serve", False):
        resolve_stage("serve")(cfg, _stage_args("serve"))
    return {"stages": {s: st for s, st, _ in timings}}


def _print_where(cfg: RunConfig, results: dict[str, dict]) -> None:
    ev = results.get("eval", {})
    tr = results.get("train", {})
    for label, value in [
        ("training run", cfg.train.out),
        ("loss curve", tr.get("loss_curve")),
        ("best checkpoint", tr.get("best_checkpoint")),
        ("eval report", ev.get("report_path")),
        ("perplexity", ev.get("perplexity")),
        ("unigram perplexity", ev.get("unigram_perplexity")),
    ]:
        if value is not None:
            say(f"  {label}: {value}")
