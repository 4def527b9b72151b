"""Sensitive-word matching: zhchat.wordmatch's Aho-Corasick against a per-word `in` loop
(what the serving blocklist did before), on 2,000 words and 20,000 replies of 10-80
characters, one in ten holding a listed word.

    python bench/wordmatch.py

Last line: {"speedup": ..., "us_per_reply_loop": ..., "us_per_reply_automaton": ...}.
"""

from __future__ import annotations

import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from test_wordmatch import _replies, _word_list, naive_find  # noqa: E402

from zhchat.wordmatch import WordMatcher  # noqa: E402


def best_of(fn, texts, runs: int = 3) -> tuple[float, int]:
    best, hits = float("inf"), 0
    for _ in range(runs):
        t0 = time.perf_counter()
        hits = sum(1 for t in texts if fn(t) is not None)
        best = min(best, time.perf_counter() - t0)
    return best, hits


def main() -> None:
    words = _word_list(2000)
    texts = _replies(20000, words)
    m = WordMatcher(words)
    t_loop, hits_loop = best_of(lambda t: naive_find(words, t), texts)
    t_ac, hits_ac = best_of(m.find, texts)
    assert hits_loop == hits_ac, (hits_loop, hits_ac)
    out = {"speedup": t_loop / t_ac, "us_per_reply_loop": t_loop / len(texts) * 1e6,
           "us_per_reply_automaton": t_ac / len(texts) * 1e6, "words": len(words), "replies": len(texts)}
    print(f"per-word loop {out['us_per_reply_loop']:.1f} us per reply, Aho-Corasick "
          f"{out['us_per_reply_automaton']:.2f} us: {out['speedup']:.0f}x")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
