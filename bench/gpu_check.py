"""What a GPU machine shows first: training precisions, MFU, and the engine on the GPU.

    python bench/gpu_check.py              # on a CUDA machine (about 2 minutes on one H200)
    python bench/gpu_check.py --cpu-smoke  # the same code paths on the CPU with tiny sizes

Needs only torch, transformers, tokenizers, pydantic and zhchat's own code: no Ray (a
machine lent for GPU checks has none and cannot install it; pydantic travels as a wheel
unpacked onto PYTHONPATH). Works with transformers 5.17 as well as the pinned version.

1. 30 steps of the `gpt2` preset (124M shapes) in bf16, fp16 (with GradScaler) and fp32,
   through pipelines.train.step.TrainStep, the step Ray Train runs: loss finite and falling,
   tokens/s, and MFU against the device's dense bf16 peak (pipelines.train.metrics table).
2. The engine's greedy tokens on the GPU equal those on the CPU (fp32, the model trained
   in step 1), for a few prompts.
3. Engine decode tokens/s at batch 1 and 16 on the GPU, in the dtype the engine picks
   (zhchat.runtime.autocast_dtype: bf16 at compute capability >= 8, fp16 below).

Without CUDA (and without --cpu-smoke) it prints {"skipped": "no CUDA"} and exits 0.
The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PROMPTS = ["你好，今天天气怎么样？", "我们周末去哪里玩？", "你喜欢看什么电影？", "晚饭吃什么好呢？"]


def sample_texts() -> list[str]:
    """Lines of the bundled sample dialogues (zhchat/data/sample): real Chinese text."""
    folder = os.path.join(ROOT, "zhchat", "data", "sample")
    lines = []
    for name in ("text_lines.txt", "chitchat_train.txt"):
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            lines += [ln.strip() for ln in f if ln.strip()]
    return lines


def build_tokenizer(texts: list[str], vocab_size: int, context: int):
    from pipelines.tokenizer_train import to_transformers, train_bpe

    return to_transformers(train_bpe([texts], vocab_size, show_progress=False), context)


def token_batches(tok, texts: list[str], batch: int, context: int, seed: int = 0):
    """Endless [batch, context] blocks of the sample text (packed, loss on every token)."""
    ids = np.concatenate([np.asarray(tok.encode(t) + [tok.eos_token_id], dtype=np.int64) for t in texts])
    rng = np.random.default_rng(seed)
    while True:
        starts = rng.integers(0, len(ids) - context - 1, size=batch)
        rows = np.stack([ids[s:s + context] for s in starts])  # [B, T]
        yield {"input_ids": rows, "labels": rows, "lengths": np.full(batch, context, dtype=np.int64)}


def train_check(tok, texts, device: str, preset: str, precision: str, steps: int, batch: int, micro: int,
                context: int, peak: float | None, lr: float) -> tuple[dict, object]:
    from pipelines.train.model import SpecialIds, build_model, flops_per_token
    from pipelines.train.step import TrainStep

    torch.manual_seed(0)
    model = build_model(preset, len(tok), context, SpecialIds.of(tok)).to(device)
    model.train()
    trainer = TrainStep(model, model, device, 1, lr=lr, weight_decay=0.1, warmup_steps=max(1, steps // 6), max_steps=steps,
                        min_lr_ratio=0.1, grad_clip=1.0, micro_batch_size=micro, precision=precision)
    data = token_batches(tok, texts, batch, context)
    losses, skipped, timed_tokens, t0 = [], 0, 0, None
    warm = min(5, steps // 3)
    for i in range(steps):
        if i == warm:
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        r = trainer.run(next(data))
        losses.append(r.loss)
        skipped += not r.applied
        if i >= warm:
            timed_tokens += r.n_tokens
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    tps = timed_tokens / max(time.perf_counter() - t0, 1e-9)
    fpt = flops_per_token(model, context)
    first, last = float(np.mean(losses[:3])), float(np.mean(losses[-3:]))
    out = {"precision": trainer.precision.name, "loss_first": round(first, 4), "loss_last": round(last, 4),
           "finite": bool(np.isfinite(losses).all()), "falling": last < first - 0.1, "skipped_steps": skipped,
           "tokens_per_s": round(tps, 1), "mfu": round(fpt * tps / peak, 4) if peak else None}
    if trainer.scaler is not None:
        out["loss_scale"] = trainer.scaler.get_scale()
    return out, model


def save_checkpoint_dir(model, tok, folder: str) -> str:
    model.config.use_cache = True
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def greedy(engine, tok, max_tokens: int) -> list[list[str]]:
    """Greedy replies as per-token strings (the engine's logprobs name each chosen token)."""
    from zhchat.dialogue import Message
    from zhchat.engine import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, repetition_penalty=1.0,
                            no_repeat_ngram_size=0, logprobs=0, seed=0)
    out = []
    for p in PROMPTS:
        tokens = []
        for d in engine.stream(engine.chat_prompt([Message("user", p)], max_tokens), params):
            tokens += [t.token for t in (d.logprobs or [])]
        out.append(tokens)
    return out


def decode_rate(engine, batch: int, max_tokens: int) -> float:
    from zhchat.dialogue import Message
    from zhchat.engine import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.8, top_k=50, no_repeat_ngram_size=0, seed=1)
    prompts = [engine.chat_prompt([Message("user", PROMPTS[i % len(PROMPTS)])], max_tokens) for i in range(batch)]
    engine.generate(prompts[:1], params)  # warm-up
    t0 = time.perf_counter()
    results = engine.generate(prompts, params)
    return sum(c.completion_tokens for c in results) / (time.perf_counter() - t0)


def engine_checks(folder: str, tok, device: str, max_tokens: int, decode_tokens: int) -> dict:
    from transformers import GPT2LMHeadModel

    from zhchat.engine import Engine

    cpu = Engine(GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32), tok, device="cpu")
    gpu = Engine(GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32), tok, device=device)
    a, b = greedy(cpu, tok, max_tokens), greedy(gpu, tok, max_tokens)
    cpu.close()
    gpu.close()
    same = [x == y for x, y in zip(a, b)]
    agree = [next((i for i, (s, t) in enumerate(zip(x, y)) if s != t), min(len(x), len(y))) for x, y in zip(a, b)]
    fast = Engine.from_pretrained(folder, device=device, max_batch_size=16)  # the engine's own dtype rule
    rates = {f"decode_tokens_per_s_b{n}": round(decode_rate(fast, n, decode_tokens), 1) for n in (1, 16)}
    dtype = str(next(fast.model.parameters()).dtype).replace("torch.", "")
    fast.close()
    return {"greedy_equal": all(same), "greedy_prompts_equal": sum(same), "greedy_prompts": len(same),
            "greedy_tokens_agreeing": agree, "engine_dtype": dtype, **rates}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="run every part on the CPU with tiny sizes")
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    if not torch.cuda.is_available() and not args.cpu_smoke:
        print(json.dumps({"skipped": "no CUDA"}))
        return
    from pipelines.train.metrics import device_peak_flops

    smoke = args.cpu_smoke
    device = "cpu" if smoke else "cuda"
    preset, batch, micro, context, vocab = ("tiny", 4, 2, 32, 600) if smoke else ("gpt2", 32, 16, 512, 8000)
    steps = 6 if smoke else args.steps
    texts = sample_texts()
    tok = build_tokenizer(texts, vocab, context)
    peak = None if smoke else device_peak_flops(device, True)
    info = {"device": "cpu" if smoke else torch.cuda.get_device_name(0), "torch": torch.__version__,
            "capability": None if smoke else ".".join(map(str, torch.cuda.get_device_capability(0))),
            "peak_flops_bf16": peak, "preset": preset, "batch": batch, "context": context}
    import transformers

    info["transformers"] = transformers.__version__
    print(json.dumps(info), flush=True)
    results, trained = {}, None
    for precision in ("bf16", "fp16", "fp32"):
        t0 = time.perf_counter()
        results[precision], model = train_check(tok, texts, device, preset, precision, steps, batch, micro,
                                                context, peak, 3e-3 if smoke else 6e-4)
        results[precision]["seconds"] = round(time.perf_counter() - t0, 1)
        print(json.dumps({"train": precision, **results[precision]}), flush=True)
        if precision == "fp32":
            trained = model
    with tempfile.TemporaryDirectory() as d:
        folder = save_checkpoint_dir(trained.float().cpu(), tok, d)
        engine = engine_checks(folder, tok, device, 8 if smoke else 32, 8 if smoke else 128)
    print(json.dumps({"engine": engine}), flush=True)
    ok = all(r["finite"] and r["falling"] for r in results.values()) and engine["greedy_equal"]
    print(json.dumps({"ok": ok, **info, "train": results, "engine": engine}))


if __name__ == "__main__":
    main()
