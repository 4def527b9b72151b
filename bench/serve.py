"""Serving benchmark: `zhchat serve` with each engine and vLLM's own server over HTTP, against
sequential in-process `model.generate`.

For each model shape (`gpt2`: 12 layers x 768, the GPT-2 124M shape; `small`: the `small`
preset, 6 x 256), random weights and a BPE trained on generated text (the tokenizer the
bench has always used), saved as a zhchat checkpoint, it measures in one run:

- sequential HF `generate`, one prompt after another, before and after the HTTP runs (the
  shared machine drifts over minutes), and the zhchat Engine's in-process time to first
  token;
- `zhchat serve` (one model replica, Ray Serve's throughput-optimized mode) with
  `serve.engine: zhchat` and with `serve.engine: vllm`;
- vLLM's own OpenAI server (`python -m vllm.entrypoints.openai.api_server --model DIR`)
  on the same checkpoint, same dtype, batch size and CPU threads;

each over HTTP with closed-loop streaming clients on `/v1/completions` (vLLM's server has
no chat template for a zhchat checkpoint; the prompt tokens are the same: zhchat gets the
text, vLLM the ids zhchat's text prompt has) at every concurrency level for a bounded time.

    python bench/serve.py            # full run, both shapes (~25 min; leave to a quiet machine)
    python bench/serve.py --quick    # smoke run: tiny model, short levels

Targets on the gpt2 shape: speedup_c16 (zhchat engine, c=16 tokens/s / sequential generate)
>= 4 and the same for the vllm engine; ttft_overhead_ms (zhchat engine, HTTP TTFT p50 at
c=1 - in-process TTFT p50) <= 15; vllm_ratio_c16 (zhchat serve with the vllm engine, c=16
tokens/s / vLLM's server's) >= 0.9; ttft_overhead_vs_vllm_ms (c=1 TTFT p50, vllm engine -
vLLM's server) <= 15; errors = 0. ITL is per token: a request's time from first to last
text over its tokens after the first; text arrives in chunks at most every
serve.stream_interval_ms (chunk gap). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
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

# layers, width, heads, positions
SHAPES = {"gpt2": (12, 768, 12, 1024), "small": (6, 256, 4, 256), "quick": (2, 64, 2, 256)}


def corpus(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))) + rng.choice("。？！，") for _ in range(n)]


def build_model(out: str, shape: str) -> None:
    """A GPT-2 of `shape`, random weights, saved like a checkpoint with its tokenizer."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from zhchat.dialogue import EOS, SPECIAL_TOKENS

    quick = shape == "quick"
    layers, width, heads, positions = SHAPES[shape]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600 if quick else 8000, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(2000 if quick else 50000), trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS,
                                 additional_special_tokens=SPECIAL_TOKENS[1:], model_max_length=positions)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(hf), n_positions=positions, n_embd=width, n_layer=layers, n_head=heads,
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
    """HF generate, one request after another, plus in-process TTFT via the zhchat Engine."""
    import torch
    from transformers import AutoModelForCausalLM

    from zhchat.engine import SamplingParams
    from zhchat.engine.local import Engine

    torch.set_num_threads(threads)
    engine = Engine.from_pretrained(model_dir, max_batch_size=16)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = [engine.text_prompt(p, max_tokens) for p in prompts]
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
    sp = SamplingParams(max_tokens=max_tokens, temperature=1.0, top_k=50, top_p=0.9,
                        repetition_penalty=1.0, no_repeat_ngram_size=0)

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


# -- load ----------------------------------------------------------------------------------------


async def client(url: str, bodies: list[dict], until: float, stats: dict, rng: random.Random):
    """A closed-loop streaming client on /v1/completions. aiohttp: the load generator shares
    the 2 cores with the server, so it should cost as little CPU per chunk as a client can.
    A new connection per request: on a reused keep-alive connection, aiohttp received some of
    vLLM's server's streams (uvicorn) all at once at their end (TTFT = the whole reply), not
    those of zhchat's (HAProxy); a loopback connect costs both the same fraction of a ms."""
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300),
                                     connector=aiohttp.TCPConnector(force_close=True)) as c:
        while time.perf_counter() < until:
            body = rng.choice(bodies)
            t0 = time.perf_counter()
            first, last, gaps, n_tokens = None, None, [], 0
            try:
                async with c.post(url, json=body) as r:
                    if r.status != 200:
                        stats["errors"] += 1
                        stats.setdefault("error_samples", []).append(f"{r.status}: {(await r.read())[:200]!r}")
                        continue
                    async for raw in r.content:
                        line = raw.decode().strip()
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            stats["errors"] += 1
                            stats.setdefault("error_samples", []).append(str(chunk["error"])[:200])
                            break
                        if chunk.get("usage"):
                            n_tokens = chunk["usage"]["completion_tokens"]
                            stats["tokens"] += n_tokens
                        if chunk.get("choices") and chunk["choices"][0].get("text"):
                            now = time.perf_counter()
                            if first is None:
                                first = now
                            else:
                                gaps.append(now - last)
                            last = now
            except Exception as e:
                stats["errors"] += 1
                stats.setdefault("error_samples", []).append(repr(e)[:200])
                continue
            if first is not None:
                stats["ttft"].append((first - t0) * 1000)
                if n_tokens > 1:
                    stats["itl"].append((last - first) * 1000 / (n_tokens - 1))
                stats["chunk_gap"].extend(g * 1000 for g in gaps)
            stats["requests"] += 1


def cpu_seconds() -> tuple[float, float]:
    """(CPU seconds the whole machine has been busy, CPU seconds of this process and its
    descendants: Ray, the Serve replicas, vLLM's processes, vLLM's server)."""
    tick = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    busy = (sum(fields[:8]) - fields[3] - fields[4]) / tick  # all but idle and iowait
    parent, used = {}, {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                st = f.read()
        except OSError:
            continue
        rest = st[st.rindex(")") + 2:].split()
        parent[int(pid)] = int(rest[1])
        used[int(pid)] = (int(rest[11]) + int(rest[12])) / tick
    me, ours = os.getpid(), 0.0
    for pid, t in used.items():
        p, seen = pid, 0
        while p > 1 and p != me and seen < 64:
            p, seen = parent.get(p, 1), seen + 1
        if p == me:
            ours += t
    return busy, ours


async def drive(url: str, bodies: list[dict], concurrency: int, seconds: float) -> dict:
    stats = {"tokens": 0, "errors": 0, "requests": 0, "ttft": [], "itl": [], "chunk_gap": []}
    busy0, ours0 = cpu_seconds()
    t0 = time.perf_counter()
    until = t0 + seconds
    await asyncio.gather(*[client(url, bodies, until, stats, random.Random(i)) for i in range(concurrency)])
    elapsed = time.perf_counter() - t0
    busy1, ours1 = cpu_seconds()
    # Cores the rest of the machine used meanwhile (the machine is shared): a level measured
    # while others ran is not comparable with one measured on a quiet machine.
    foreign = max(0.0, (busy1 - busy0) - (ours1 - ours0)) / elapsed
    out = {"concurrency": concurrency, "tokens_per_s": round(stats["tokens"] / elapsed, 1),
           "foreign_cpus": round(foreign, 2), "bench_cpus": round((ours1 - ours0) / elapsed, 2),
           "requests": stats["requests"], "errors": stats["errors"],
           "ttft_p50_ms": round(pct(stats["ttft"], 50), 1), "ttft_p99_ms": round(pct(stats["ttft"], 99), 1),
           "itl_p50_ms": round(pct(stats["itl"], 50), 1), "itl_p99_ms": round(pct(stats["itl"], 99), 1),
           "chunk_gap_p50_ms": round(pct(stats["chunk_gap"], 50), 1)}
    if stats.get("error_samples"):
        out["error_samples"] = stats["error_samples"][:3]
    return out


def run_levels(label: str, url: str, bodies: list[dict], levels: list[int], seconds: float) -> list[dict]:
    asyncio.run(drive(url, bodies, 1, 2.0))  # warm-up
    results = []
    for c in levels:
        r = asyncio.run(drive(url, bodies, c, seconds))
        results.append(r)
        print(f"  {label:>12} c={c:>3}: {r['tokens_per_s']:8.1f} tokens/s  TTFT p50 {r['ttft_p50_ms']:6.1f} ms "
              f"p99 {r['ttft_p99_ms']:6.1f} ms  ITL p50 {r['itl_p50_ms']:6.1f} ms p99 {r['itl_p99_ms']:6.1f} ms  "
              f"chunk gap p50 {r['chunk_gap_p50_ms']:5.1f} ms  requests {r['requests']}  errors {r['errors']}  "
              f"CPUs: bench {r['bench_cpus']:.2f}, others {r['foreign_cpus']:.2f}",
              file=sys.stderr, flush=True)
    return results


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_cpu_env(threads: int) -> dict[str, str]:
    """The CPU settings the vllm engine uses (zhchat/engine/vllm.py), for vLLM's own server."""
    from zhchat.engine.vllm import _cpu_list

    return {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
            "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", _cpu_list(threads))}


# -- servers -------------------------------------------------------------------------------------


def zhchat_serve(model_dir: str, engine: str, a, bodies: list[dict]) -> list[dict]:
    """`zhchat serve` on the local cluster zhchat itself starts, with `serve.engine: engine`."""
    import ray
    from ray import serve

    from services import launch
    from zhchat.config import GenerationDefaults, RayConfig, ServeConfig
    from zhchat.runtime import init_ray

    init_ray(RayConfig(num_cpus=4, include_dashboard=False))
    try:
        pacing = {} if a.stream_interval_ms is None else {"stream_interval_ms": a.stream_interval_ms}
        cfg = ServeConfig(model=model_dir, port=free_port(), min_replicas=1, max_replicas=1, replica_cpus=a.cpus,
                          engine=engine, max_batch_size=a.max_batch_size, max_ongoing_requests=64,
                          ingress_cpus=0.25, **pacing,
                          generation=GenerationDefaults(max_tokens=a.max_tokens, max_tokens_cap=256))
        t0 = time.perf_counter()
        base = launch.start(cfg, name="bench", route_prefix="/")
        print(f"  zhchat serve ({engine} engine) up in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        return run_levels(f"zhchat/{engine}", base + "/v1/completions", bodies, a.levels, a.seconds)
    finally:
        serve.shutdown()
        ray.shutdown()


def vllm_server(model_dir: str, a, bodies: list[dict], context_length: int) -> list[dict]:
    """vLLM's own OpenAI server in a process of its own, on the same checkpoint and CPUs."""
    import aiohttp  # noqa: F401  (fail before starting a server)

    port = free_port()
    env = {**os.environ, **vllm_cpu_env(max(1, int(a.cpus))), "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
           "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "bench", "--dtype", "float32",
           "--max-model-len", str(context_length), "--max-num-seqs", str(a.max_batch_size), "--seed", "0",
           "--disable-uvicorn-access-log", "--disable-log-stats"]
    log = tempfile.NamedTemporaryFile("w+", prefix="bench-vllm-server-", suffix=".log", delete=False)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        import urllib.request

        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"vLLM's server exited ({proc.returncode}):\n{log.read()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.perf_counter() - t0 > 900:
                raise RuntimeError("vLLM's server did not start within 900 s")
            time.sleep(1)
        print(f"  vLLM server up in {time.perf_counter() - t0:.0f} s (log {log.name})", file=sys.stderr, flush=True)
        return run_levels("vllm-server", f"http://127.0.0.1:{port}/v1/completions", bodies, a.levels, a.seconds)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def bench_shape(shape: str, a) -> dict:
    from zhchat.tokenizer import load_tokenizer

    prompts = corpus(32, seed=1)
    with tempfile.TemporaryDirectory() as model_dir:
        build_model(model_dir, shape)
        tok = load_tokenizer(model_dir)
        from zhchat.dialogue import DialogueFormat

        context_length = SHAPES[shape][3]
        fmt = DialogueFormat(tok, context_length)
        print(f"[{shape}] {SHAPES[shape][:3]} layers/width/heads, vocab {len(tok)}", file=sys.stderr, flush=True)
        sampling = {"max_tokens": a.max_tokens, "temperature": 1.0, "top_k": 50, "top_p": 0.9,
                    "stream": True, "stream_options": {"include_usage": True}}
        zh_bodies = [{"model": "zhchat", "prompt": p, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
                      **sampling} for p in prompts]
        # The token ids of zhchat's text prompt (zhchat.engine: text_prompt), so both see the same prompt.
        vl_bodies = [{"model": "bench", "prompt": [fmt.eos_id] + fmt.encode_text(p), **sampling} for p in prompts]
        seq_args = (model_dir, prompts[: 4 if a.quick else 16], a.max_tokens, max(1, int(a.cpus)))
        before = sequential_generate(*seq_args)
        print(f"  sequential generate: {before['tokens_per_s']:.1f} tokens/s; in-process TTFT p50 "
              f"{before['ttft_p50_ms']:.1f} ms", file=sys.stderr, flush=True)
        runs = {}
        for engine in a.engines:
            runs[f"zhchat_{engine}"] = zhchat_serve(model_dir, engine, a, zh_bodies)
        if "vllm" in a.engines and not a.no_vllm_server:
            runs["vllm_server"] = vllm_server(model_dir, a, vl_bodies, context_length)
        after = sequential_generate(*seq_args)
        print(f"  sequential generate: {after['tokens_per_s']:.1f} tokens/s; in-process TTFT p50 "
              f"{after['ttft_p50_ms']:.1f} ms (again)", file=sys.stderr, flush=True)
    seq_tps = (before["tokens"] + after["tokens"]) / (  # total tokens / total time
        before["tokens"] / before["tokens_per_s"] + after["tokens"] / after["tokens_per_s"])
    seq_ttft = pct(before["ttft"] + after["ttft"], 50)

    def at(run: str, c: int) -> dict:
        by_c = {r["concurrency"]: r for r in runs.get(run, [])}
        return by_c.get(c) or {}

    def ratio(x, y, nd=2):
        return round(x / y, nd) if x is not None and y else None

    out = {
        "sequential_tokens_per_s": round(seq_tps, 1),
        "sequential_tokens_per_s_before_after": [round(before["tokens_per_s"], 1), round(after["tokens_per_s"], 1)],
        "in_process_ttft_p50_ms": round(seq_ttft, 1),
        "speedup_c16": ratio(at("zhchat_zhchat", 16).get("tokens_per_s"), seq_tps),
        "speedup_c16_vllm_engine": ratio(at("zhchat_vllm", 16).get("tokens_per_s"), seq_tps),
        "ttft_overhead_ms": (round(at("zhchat_zhchat", 1)["ttft_p50_ms"] - seq_ttft, 1)
                             if at("zhchat_zhchat", 1) else None),
        "vllm_ratio_c16": ratio(at("zhchat_vllm", 16).get("tokens_per_s"), at("vllm_server", 16).get("tokens_per_s")),
        "ttft_overhead_vs_vllm_ms": (round(at("zhchat_vllm", 1)["ttft_p50_ms"] - at("vllm_server", 1)["ttft_p50_ms"], 1)
                                     if at("zhchat_vllm", 1) and at("vllm_server", 1) else None),
        "errors": sum(r["errors"] for rs in runs.values() for r in rs),
        # The most CPU the rest of the machine took during a level (0: a quiet machine).
        "foreign_cpus_max": max((r["foreign_cpus"] for rs in runs.values() for r in rs), default=0.0),
        "levels": runs,
    }
    print(f"  [{shape}] " + json.dumps({k: v for k, v in out.items() if k != "levels"}), file=sys.stderr, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, short levels, both engines (smoke run)")
    ap.add_argument("--shapes", default=None, help="comma-separated, of gpt2, small (default: both; --quick: quick)")
    ap.add_argument("--engines", default="zhchat,vllm", help="zhchat serve engines to measure")
    ap.add_argument("--no-vllm-server", action="store_true", help="skip vLLM's own server")
    ap.add_argument("--seconds", type=float, default=None, help="time per concurrency level")
    ap.add_argument("--levels", default="1,4,16,32")
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--max-batch-size", type=int, default=32, help="every engine's (and vLLM server's) batch")
    ap.add_argument("--cpus", type=float, default=1.0,
                    help="CPUs of the model replica = torch threads (zhchat) = OpenMP threads (vLLM, both)")
    ap.add_argument("--stream-interval-ms", type=float, default=None,
                    help="serve.stream_interval_ms (default: the config's); 0 sends every delta at once")
    a = ap.parse_args()
    a.seconds = a.seconds or (3.0 if a.quick else 30.0)
    a.max_tokens = a.max_tokens or (16 if a.quick else 64)
    a.levels = [int(x) for x in a.levels.split(",")]
    a.engines = [e for e in a.engines.split(",") if e]
    shapes = (a.shapes or ("quick" if a.quick else "gpt2,small")).split(",")
    results = {s: bench_shape(s, a) for s in shapes}
    main_shape = "gpt2" if "gpt2" in results else shapes[0]
    r = results[main_shape]
    summary = {k: r[k] for k in ("speedup_c16", "ttft_overhead_ms", "vllm_ratio_c16", "ttft_overhead_vs_vllm_ms")}
    summary["errors"] = sum(x["errors"] for x in results.values())
    summary.update({"shape": main_shape, "speedup_c16_vllm_engine": r["speedup_c16_vllm_engine"],
                    "foreign_cpus_max": r["foreign_cpus_max"],
                    "cpus": a.cpus, "max_batch_size": a.max_batch_size, "max_tokens": a.max_tokens,
                    "quick": a.quick, "shapes": results})
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
