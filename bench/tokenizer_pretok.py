"""Which encode-time pre-tokenizer gives the fewest tokens per character?

Trains the project's BPE (pipelines/tokenizer_train.py: merges learned from jieba words) on
90 % of the lines of a UTF-8 text file, then encodes the other 10 % with:
  script_split  - the saved one: runs of one script class, then bytes (no jieba)
  no_split      - the whole text as one piece, then bytes
  gpt2_regex    - GPT-2's ByteLevel regex
  jieba_oracle  - jieba at encode time (needs a Python pre-tokenizer, which cannot be saved)

    python bench/tokenizer_pretok.py corpus.txt --vocab-size 8000 32000
    python bench/tokenizer_pretok.py --quick

Prints one JSON object on its last line: {"vocab_size": {variant: tokens_per_char}, ...}.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time

QUICK_LINES = [
    "你好，今天天气怎么样？", "今天天气很好，我们去公园散步吧。", "我喜欢看电影，你呢？",
    "周末你打算做什么？", "我想在家看书，然后做饭。", "明天要下雨，记得带伞。", "北京的秋天特别美。",
    "上海的小笼包很好吃。", "我们一起学习中文吧！", "这本书的质量还不错，内容也很丰富。",
    "ChatGPT是一种基于语言模型的聊天机器人技术。", "iPhone 15 Pro 的价格是 7999 元。",
]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("corpus", nargs="?", help="UTF-8 text, one text per line")
    ap.add_argument("--vocab-size", type=int, nargs="+", default=[8000])
    ap.add_argument("--max-lines", type=int, default=200_000)
    ap.add_argument("--quick", action="store_true", help="Tiny built-in text: proves the script runs")
    a = ap.parse_args(argv)

    import jieba
    from tokenizers import pre_tokenizers as pt

    from pipelines.tokenizer_train import build_pre_tokenizer, train_bpe

    jieba.setLogLevel(60)
    if a.quick:
        lines, sizes = QUICK_LINES * 50, [300]
    else:
        if not a.corpus:
            ap.error("give a corpus file or --quick")
        with open(a.corpus, encoding="utf-8") as f:
            lines = [ln.strip() for ln in f if ln.strip()][: a.max_lines]
        sizes = a.vocab_size
    random.Random(0).shuffle(lines)
    n_val = max(1, len(lines) // 10)
    val, train = lines[:n_val], lines[n_val:]
    t0 = time.time()
    words = [jieba.lcut(x) for x in train]
    seg_s = time.time() - t0
    chars = sum(map(len, val))
    results: dict = {}
    for vs in sizes:
        tok = train_bpe(iter(words), vs, min_frequency=2, show_progress=False)
        variants = {
            "script_split": build_pre_tokenizer(),
            "no_split": pt.ByteLevel(add_prefix_space=False, use_regex=False),
            "gpt2_regex": pt.ByteLevel(add_prefix_space=False, use_regex=True),
        }
        row = {}
        for name, pre in variants.items():
            tok.pre_tokenizer = pre
            t = time.time()
            n = sum(len(e.ids) for e in tok.encode_batch(val, add_special_tokens=False))
            row[name] = round(n / chars, 4)
            row[name + "_chars_per_s"] = round(chars / max(time.time() - t, 1e-9))
        tok.pre_tokenizer = pt.ByteLevel(add_prefix_space=False, use_regex=False)
        pieces = [w for x in val for w in jieba.lcut(x)]
        row["jieba_oracle"] = round(sum(len(e.ids) for e in tok.encode_batch(pieces, add_special_tokens=False)) / chars, 4)
        results[str(vs)] = row
        print(f"vocab {vs}: {row}", file=sys.stderr)
    out = {"tokens_per_char": results, "train_lines": len(train), "val_chars": chars, "jieba_s": round(seg_s, 2),
           "quick": a.quick}
    print(json.dumps(out, ensure_ascii=False))
    return out


if __name__ == "__main__":
    main()
