"""The `zhchat` command: one subcommand per stage, and `run` for all of them in order.

Every subcommand takes `--config FILE.yaml` and its main inputs as flags; flags override
the file and both are validated by one pydantic schema before any work starts.
Stage code is imported lazily so `zhchat --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import json
import signal
import sys
import threading
from typing import Any, Callable

from .config import FORMATS, ConfigError, RunConfig, check_stage_inputs, load_config

# subcommand -> (module, function); each function takes the resolved RunConfig and the
# parsed args and returns a JSON-able summary.
STAGES: dict[str, tuple[str, str]] = {
    "crawl": ("pipelines.crawl", "run_crawl"),
    "ingest": ("pipelines.ingest", "run_ingest"),
    "preprocess": ("pipelines.preprocess", "run_preprocess"),
    "train": ("pipelines.train", "run_train"),
    "eval": ("pipelines.evaluate", "run_eval"),
    "serve": ("services.launch", "run_serve"),
    "chat": ("zhchat.chat", "run_chat"),
    "submit": ("zhchat.submit", "run_submit"),
    "run": ("zhchat.run", "run_all"),
}


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (one schema for every stage)")
    p.add_argument("--workdir", help="Base folder for stage outputs (default: ./zhchat-run)")
    p.add_argument("--ray-address", help="Ray cluster address (default: RAY_ADDRESS or a local cluster)")
    p.add_argument("--num-cpus", type=int, help="CPUs for a local Ray cluster")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zhchat", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("crawl", help="Crawl seed URLs into pages and dialogue tables")
    _common(p)
    p.add_argument("--seed", action="append", dest="seeds", help="Seed URL (repeatable)")
    p.add_argument("--out")
    p.add_argument("--max-pages", type=int)
    p.add_argument("--max-depth", type=int)
    p.add_argument("--allowed-domain", action="append", dest="allowed_domains", help="Repeatable; default: the seeds' hosts")
    p.add_argument("--per-host-concurrency", type=int)
    p.add_argument("--per-host-rps", type=float)

    p = sub.add_parser("ingest", help="Import dialogue files into a Parquet dialogue table")
    _common(p)
    p.add_argument("inputs", nargs="*", help="Files or folders (gzip works)")
    p.add_argument("--format", choices=FORMATS)
    p.add_argument("--out")

    p = sub.add_parser("preprocess", help="Clean, segment, split, train the tokenizer, tokenize")
    _common(p)
    p.add_argument("--in", dest="input")
    p.add_argument("--out")
    p.add_argument("--tokenizer", dest="pretrained_tokenizer", help="Use this tokenizer (path or hub id)")
    p.add_argument("--vocab-size", type=int)
    p.add_argument("--context-length", type=int)
    p.add_argument("--force", action="store_true", default=None, help="Redo the work even if the manifest says it is done")

    p = sub.add_parser("train", help="Train GPT-2 on Ray Train")
    _common(p)
    p.add_argument("--data")
    p.add_argument("--out")
    p.add_argument("--name")
    p.add_argument("--preset", choices=["tiny", "small", "gpt2", "gpt2-medium"])
    p.add_argument("--init-from")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--num-workers", type=int)
    p.add_argument("--min-workers", type=int)
    p.add_argument("--global-batch-size", type=int)
    p.add_argument("--micro-batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--use-gpu", choices=["auto", "yes", "no"])

    p = sub.add_parser("eval", help="Perplexity, BLEU, distinct-n and sample replies")
    _common(p)
    p.add_argument("--model")
    p.add_argument("--data")
    p.add_argument("--json", action="store_true", help="Also print the JSON report to stdout")
    p.add_argument("--max-samples", type=int, help="Test contexts to generate replies for")

    p = sub.add_parser("serve", help="Serve the chat app (OpenAI-style API and web page)")
    _common(p)
    p.add_argument("--model")
    p.add_argument("--host")
    p.add_argument("--port", type=int)

    p = sub.add_parser("chat", help="Chat with a model in the terminal")
    _common(p)
    p.add_argument("--model")

    p = sub.add_parser("submit", help="Submit the pipeline (or one stage) as a Ray job")
    _common(p)
    p.add_argument("config_file", nargs="?", help="Same as --config")
    p.add_argument("--stage", default="run", choices=[s for s in STAGES if s not in ("submit", "chat")])
    p.add_argument("--address", help="Ray job server address (default: RAY_ADDRESS)")
    p.add_argument("--follow", action="store_true", help="Stream the job's logs until it ends")

    p = sub.add_parser("run", help="Run every stage in order on the embedded default or a config")
    _common(p)
    p.add_argument("config_file", nargs="?", help="Same as --config")
    p.add_argument("--no-serve", action="store_true", help="Stop after evaluation")
    return parser


def overrides_from_args(a: argparse.Namespace) -> dict[str, Any]:
    """Map flags onto the config tree; unset flags are None and keep the file's values."""
    g = lambda name: getattr(a, name, None)  # noqa: E731
    return {
        "workdir": g("workdir"),
        "ray": {"address": g("ray_address"), "num_cpus": g("num_cpus")},
        "crawl": {"seeds": g("seeds"), "out": g("out") if a.command == "crawl" else None,
                  "max_pages": g("max_pages"), "max_depth": g("max_depth"),
                  "allowed_domains": g("allowed_domains"), "per_host_concurrency": g("per_host_concurrency"),
                  "per_host_rps": g("per_host_rps")},
        "ingest": {"inputs": g("inputs") or None, "format": g("format"),
                   "out": g("out") if a.command == "ingest" else None},
        "preprocess": {
            "in": g("input"), "out": g("out") if a.command == "preprocess" else None,
            "tokenizer": {"pretrained": g("pretrained_tokenizer"), "vocab_size": g("vocab_size")},
            "format": {"context_length": g("context_length")}, "force": g("force"),
        },
        "train": {"data": g("data") if a.command == "train" else None,
                  "out": g("out") if a.command == "train" else None,
                  "name": g("name"), "preset": g("preset"), "init_from": g("init_from"),
                  "max_steps": g("max_steps"), "num_workers": g("num_workers"), "min_workers": g("min_workers"),
                  "global_batch_size": g("global_batch_size"), "micro_batch_size": g("micro_batch_size"),
                  "lr": g("lr"), "checkpoint_every": g("checkpoint_every"), "seed": g("seed"),
                  "use_gpu": g("use_gpu")},
        "eval": {"model": g("model") if a.command == "eval" else None,
                 "data": g("data") if a.command == "eval" else None, "max_samples": g("max_samples")},
        "serve": {"model": g("model") if a.command in ("serve", "chat") else None,
                  "host": g("host"), "port": g("port")},
    }


def resolve_stage(name: str) -> Callable[..., Any]:
    module, func = STAGES[name]
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and (e.name == module or module.startswith(e.name + ".")):
            raise SystemExit(f"zhchat {name}: this stage is not available in this version ({module} missing)")
        raise
    return getattr(mod, func)


_terminated = False


def _sigterm(signum, frame) -> None:
    global _terminated
    _terminated = True
    raise KeyboardInterrupt


def stop_on_sigterm() -> None:
    """SIGTERM does what Ctrl-C does: KeyboardInterrupt in the main thread, which every stage
    already unwinds cleanly. ray.init() installs a SIGTERM handler of its own (sys.exit at
    whatever the main thread is doing, with Ray's threads running: a C++ stack and an
    abort, status 134), so whoever starts Ray calls this again after it."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _sigterm)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config_path = args.config or getattr(args, "config_file", None)
    try:
        cfg: RunConfig = load_config(config_path, overrides_from_args(args)).resolved()
        check_stage_inputs(cfg, args.command)
    except ConfigError as e:
        print(f"zhchat {args.command}: {e}", file=sys.stderr)
        return 2
    fn = resolve_stage(args.command)
    stop_on_sigterm()
    try:
        summary = fn(cfg, args)
    except KeyboardInterrupt:
        # 128 + the signal, as a shell reports a process killed by it
        print(f"zhchat {args.command}: {'terminated' if _terminated else 'interrupted'}", file=sys.stderr)
        return 143 if _terminated else 130
    except SystemExit as e:
        if e.code != signal.SIGTERM:
            raise
        # SIGTERM while ray.init() ran: its handler (sys.exit(15)) was on, not ours.
        print(f"zhchat {args.command}: terminated", file=sys.stderr)
        return 143
    except (ValueError, FileNotFoundError) as e:
        print(f"zhchat {args.command}: error: {e}", file=sys.stderr)
        return 1
    if getattr(args, "json", False) and summary is not None:
        print(json.dumps(summary, ensure_ascii=False, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
