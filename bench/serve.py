"""Serving benchmark: the Serve app over HTTP vs sequential in-process `model.generate`.

Builds the `small` model from a config (6 layers x 256, vocab ~8k, BPE trained on generated
text), starts the app (one model replica) and drives it with closed-loop streaming clients
at each concurrency level for a bounded time. In the same run, before and after the HTTP
levels, it measures sequential HF `generate` with the same prompts and lengths, and
in-process time to first token.

    python bench/serve.py            # full size (leave to a quiet machine)
    python bench/serve.py --quick    # smoke run: tiny model, short levels

Targets: speedup_c16 = tokens/s at concurrency 16 / sequential generate >= 4;
ttft_overhead_ms = HTTP TTFT p50 at concurrency 1 - in-process TTFT p50 <= 15; errors = 0.
Inter-token latency (ITL) is per token: a request's time from first to last text over its
tokens after the first; text arrives in chunks at most every serve.stream_interval_ms
(chunk gap). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ["PYTHONPATH"] = ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = ["今天", "天气", "很好", "我们", "一起", "去", "公园", "散步", "吃饭", "了吗", "你", "我", "喜欢", "看", "电影",
         "周末", "打算", "做", "什么", "北京", "上海", "秋天", "特别", "美", "小笼包", "好吃", "学习", "中文", "明天",
         "下雨", "记得", "带伞", "谢谢", "提醒", "朋友", "工作", "休息", "音乐", "城市", "早上", "晚上", "咖啡"]


def corpus(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))) + rng.choice("。？！，") for _ in range(n)]


def build_model(out: str, quick: bool) -> None:
    """The `small` preset (or a tiny one for --quick), random weights, saved like a checkpoint."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from zhchat.dialogue import EOS, SPECIAL_TOKENS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600 if quick else 8000, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(2000 if quick else 50000), trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS,
                                 additional_special_tokens=SPECIAL_TOKENS[1:], model_max_length=256)
    layers, width = (2, 64) if quick else (6, 256)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(hf), n_positions=256, n_embd=width, n_layer=layers, n_head=max(2, width // 64),
                     tie_word_embeddings=False, bos_token_id=hf.eos_token_id, eos_token_id=hf.eos_token_id,
                     pad_token_id=hf.eos_token_id)
    model = GPT2LMHeadModel(cfg)
    with torch.no_grad():  # an untrained model must not stop early: special tokens get logit 0
        for t in SPECIAL_TOKENS:
            model.lm_head.weight[hf.convert_tokens_to_ids(t)] = 0
    model.save_pretrained(out)
    hf.save_pretrained(out)


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def sequential_generate(model_dir: str, prompts: list[str], max_tokens: int, threads: int) -> dict:
    """HF generate, one request after another, plus in-process TTFT via the Engine."""
    import torch
    from transformers import AutoModelForCausalLM

    from zhchat.dialogue import Message
    from zhchat.generation import Engine, SamplingParams

    torch.set_num_threads(threads)
    engine = Engine.from_pretrained(model_dir, max_batch_size=16)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = [engine.chat_prompt([Message("user", p)], max_tokens) for p in prompts]
    tokens, t0 = 0, time.perf_counter()
    with torch.inference_mode():
        for p in ids:
            x = torch.tensor([p])
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_tokens,
                                 min_new_tokens=max_tokens, do_sample=True, top_k=50, top_p=0.9,
                                 pad_token_id=engine.fmt.eos_id)
            tokens += out.shape[1] - len(p)
    seq_tps = tokens / (time.perf_counter() - t0)
    # The same quantity the HTTP clients measure: time to the first delta with text, with the
    # same sampling (a byte-level BPE token can be part of a character, and the engine holds
    # such bytes back until the character is complete).
    ttft = []
    sp = SamplingParams(max_tokens=max_tokens, temperature=1.0, top_k=50, top_p=0.9)

    def first_text(p: list[int]) -> float:
        t = time.perf_counter()
        deltas = engine.stream(p, sp)
        for d in deltas:
            if d.text:
                break
        elapsed = (time.perf_counter() - t) * 1000
        deltas.close()  # cancels the rest of the reply
        return elapsed

    first_text(ids[0])  # warm-up: thread start, first-call allocations
    for p in ids:
        ttft.append(first_text(p))
    engine.close()
    return {"tokens_per_s": seq_tps, "ttft_p50_ms": pct(ttft, 50), "tokens": tokens, "ttft": ttft}


async def client(url: str, prompts: list[str], max_tokens: int, until: float, stats: dict, rng: random.Random):
    """A closed-loop streaming client. aiohttp: the load generator shares the 2 cores with
    the server, so it should cost as little CPU per chunk as a client can."""
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as c:
        while time.perf_counter() < until:
            body = {"messages": [{"role": "user", "content": rng.choice(prompts)}], "max_tokens": max_tokens,
                    "temperature": 1.0, "top_k": 50, "top_p": 0.9, "repetition_penalty": 1.0,
                    "no_repeat_ngram_size": 0, "stream": True, "stream_options": {"include_usage": True}}
            t0 = time.perf_counter()
            first, last, gaps, n_tokens = None, None, [], 0
            try:
                async with c.post(url, json=body) as r:
                    if r.status != 200:
                        stats["errors"] += 1
                        await r.read()
                        continue
                    async for raw in r.content:
                        line = raw.decode().strip()
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            stats["errors"] += 1
                            break
                        if chunk.get("usage"):
                            n_tokens = chunk["usage"]["completion_tokens"]
                            stats["tokens"] += n_tokens
                        if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                            now = time.perf_counter()
                            if first is None:
                                first = now
                            else:
                                gaps.append(now - last)
                            last = now
            except Exception:
                stats["errors"] += 1
                continue
            if first is not None:
                stats["ttft"].append((first - t0) * 1000)
                # Per token: a chunk carries every token of its stream interval (serve.stream_interval_ms).
                if n_tokens > 1:
                    stats["itl"].append((last - first) * 1000 / (n_tokens - 1))
                stats["chunk_gap"].extend(g * 1000 for g in gaps)
            stats["requests"] += 1


async def drive(url: str, prompts: list[str], max_tokens: int, concurrency: int, seconds: float) -> dict:
    stats = {"tokens": 0, "errors": 0, "requests": 0, "ttft": [], "itl": [], "chunk_gap": []}
    t0 = time.perf_counter()
    until = t0 + seconds
    await asyncio.gather(*[client(url, prompts, max_tokens, until, stats, random.Random(i))
                           for i in range(concurrency)])
    elapsed = time.perf_counter() - t0
    return {"concurrency": concurrency, "tokens_per_s": stats["tokens"] / elapsed, "requests": stats["requests"],
            "errors": stats["errors"], "ttft_p50_ms": pct(stats["ttft"], 50), "ttft_p99_ms": pct(stats["ttft"], 99),
            "itl_p50_ms": pct(stats["itl"], 50), "itl_p99_ms": pct(stats["itl"], 99),
            "chunk_gap_p50_ms": pct(stats["chunk_gap"], 50)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, short levels (smoke run)")
    ap.add_argument("--seconds", type=float, default=None, help="time per concurrency level")
    ap.add_argument("--levels", default="1,4,16")
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--cpus", type=float, default=1.0, help="CPUs (= torch threads) of the model replica")
    ap.add_argument("--stream-interval-ms", type=float, default=None,
                    help="serve.stream_interval_ms (default: the config's); 0 sends every delta at once")
    a = ap.parse_args()
    seconds = a.seconds or (3.0 if a.quick else 30.0)
    max_tokens = a.max_tokens or (16 if a.quick else 64)
    levels = [int(x) for x in a.levels.split(",")]
    prompts = corpus(32, seed=1)

    import ray
    from ray import serve

    from services import launch
    from zhchat.config import GenerationDefaults, RayConfig, ServeConfig
    from zhchat.runtime import init_ray

    with tempfile.TemporaryDirectory() as model_dir:
        build_model(model_dir, a.quick)
        # Sequential generate before and after the HTTP levels: the shared machine's speed
        # drifts over minutes (one 4-second measurement ranged 186-324 tokens/s across runs).
        seq_args = (model_dir, prompts[: 4 if a.quick else 16], max_tokens, max(1, int(a.cpus)))
        before = sequential_generate(*seq_args)
        print(f"sequential generate: {before['tokens_per_s']:.1f} tokens/s; in-process TTFT p50 "
              f"{before['ttft_p50_ms']:.1f} ms", file=sys.stderr)
        # The local cluster zhchat itself starts (with Ray's throughput-optimized Serve mode).
        init_ray(RayConfig(num_cpus=4, include_dashboard=False))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        pacing = {} if a.stream_interval_ms is None else {"stream_interval_ms": a.stream_interval_ms}
        cfg = ServeConfig(model=model_dir, port=port, min_replicas=1, max_replicas=1, replica_cpus=a.cpus, **pacing,
                          max_batch_size=16, max_ongoing_requests=64, ingress_cpus=0.25,
                          generation=GenerationDefaults(max_tokens=max_tokens, max_tokens_cap=256))
        base = launch.start(cfg, name="bench", route_prefix="/")
        url = base + "/v1/chat/completions"
        asyncio.run(drive(url, prompts, max_tokens, 1, 1.0))  # warm-up
        results = []
        for c in levels:
            r = asyncio.run(drive(url, prompts, max_tokens, c, seconds))
            results.append(r)
            print(f"c={c:>3}: {r['tokens_per_s']:8.1f} tokens/s  TTFT p50 {r['ttft_p50_ms']:6.1f} ms "
                  f"p99 {r['ttft_p99_ms']:6.1f} ms  ITL p50 {r['itl_p50_ms']:6.1f} ms p99 {r['itl_p99_ms']:6.1f} ms  "
                  f"chunk gap p50 {r['chunk_gap_p50_ms']:5.1f} ms  "
                  f"requests {r['requests']}  errors {r['errors']}", file=sys.stderr)
        serve.shutdown()
        ray.shutdown()
        after = sequential_generate(*seq_args)
        print(f"sequential generate: {after['tokens_per_s']:.1f} tokens/s; in-process TTFT p50 "
              f"{after['ttft_p50_ms']:.1f} ms (again)", file=sys.stderr)
    seq = {"tokens_per_s": (before["tokens"] + after["tokens"]) /  # total tokens / total time
           (before["tokens"] / before["tokens_per_s"] + after["tokens"] / after["tokens_per_s"]),
           "ttft_p50_ms": pct(before["ttft"] + after["ttft"], 50)}
    by_c = {r["concurrency"]: r for r in results}
    top = by_c.get(16, results[-1])
    one = by_c.get(1, results[0])
    summary = {
        "speedup_c16": round(top["tokens_per_s"] / seq["tokens_per_s"], 2),
        "ttft_overhead_ms": round(one["ttft_p50_ms"] - seq["ttft_p50_ms"], 1),
        "errors": sum(r["errors"] for r in results),
        "sequential_tokens_per_s": round(seq["tokens_per_s"], 1),
        "sequential_tokens_per_s_before_after": [round(before["tokens_per_s"], 1), round(after["tokens_per_s"], 1)],
        "stream_interval_ms": cfg.stream_interval_ms, "levels": results, "quick": a.quick,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
