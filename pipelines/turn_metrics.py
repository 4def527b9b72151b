"""Multi-turn evaluation: eval's reply metrics broken down by turn index, and self-repetition.

Plain functions (no Ray) over eval samples: dicts with `context` (the turns before the
reply, oldest first), `reference` (the human reply, the dialogue's last turn) and `reply`
(the model's reply to the same context).

- Turn index: the reply's place among the turns of its own speaker. Speakers alternate
  and the reply is the dialogue's next turn, so the context turns at the reply's parity
  (context[-2], context[-4], ...) are that speaker's earlier turns and
  turn index = 1 + len(context) // 2. A reply to a one-turn context (user → reply) is
  turn 1; to [user, assistant, user] turn 2; to five turns turn 3. Buckets: "1", "2",
  "3", "4+" (4+ holds turns 4, 5, 6, ...). This counts the model side's turns, so a
  higher bucket means the speaker has already talked more in the chat — where users
  report replies going generic and repeating themselves.
- Per bucket, for the model's replies and, as the human baseline, for the references on
  the same samples: count, average length (characters, whitespace not counted), distinct-1/2
  over characters and the repetition rate, all with pipelines/evaluate.py's own functions.
  Distinct-n is a corpus ratio and falls as a bucket holds more replies: compare model and
  reference within a bucket (same count), not raw values across buckets of different sizes.
- Self-repetition: the share of replies containing a character n-gram of length >= min_n
  (default 4) that the SAME speaker used in an earlier turn of the dialogue (the context
  turns at the reply's parity; the other speaker's turns never count). Whitespace is
  dropped before n-grams are taken, as evaluate.py does, and n-grams made only of
  punctuation/symbols (……, ！！！！) are ignored. A longer shared phrase always contains a
  shared min_n-gram, so "length >= min_n" is tested on min_n-grams.
"""

from __future__ import annotations

import math
import os
import tempfile
import unicodedata
from typing import Iterable, Sequence

from pipelines.evaluate import _chars, distinct_n, repetition_rate

BUCKETS = ("1", "2", "3", "4+")
TURN_PNG = "turn_metrics.png"
METRICS = ("avg_length", "distinct1", "distinct2", "repetition_rate", "self_repetition")


# -- turns and phrases -----------------------------------------------------------------------


def turn_index(context: Sequence[str]) -> int:
    """1-based index of the reply among its speaker's turns: 1 + the same-speaker context turns."""
    return 1 + len(context) // 2


def turn_bucket(index: int) -> str:
    if index < 1:
        raise ValueError(f"turn index {index} < 1")
    return str(index) if index < 4 else "4+"


def own_turns(context: Sequence[str]) -> list[str]:
    """The reply speaker's earlier turns, oldest first: context turns at the reply's parity."""
    n = len(context)
    return [str(context[j]) for j in range(n) if (n - j) % 2 == 0]


def _punct_only(chars: Iterable[str]) -> bool:
    return all(unicodedata.category(c)[0] in "PSZ" for c in chars)


def repeated_phrase(reply: str, context: Sequence[str], min_n: int = 4) -> str | None:
    """The longest phrase (>= min_n characters, not only punctuation) of `reply` that its
    speaker already used in an earlier turn; None if there is none."""
    if min_n < 1:
        raise ValueError("min_n must be >= 1")
    earlier = ["".join(_chars(t)) for t in own_turns(context)]
    text = "".join(_chars(reply))
    if not earlier or len(text) < min_n:
        return None
    best = None
    for i in range(len(text) - min_n + 1):
        gram = text[i:i + min_n]
        if _punct_only(gram) or not any(gram in t for t in earlier):
            continue
        end = i + min_n
        while end < len(text) and any(text[i:end + 1] in t for t in earlier):
            end += 1
        if best is None or end - i > len(best):
            best = text[i:end]
    return best


def self_repetition_rate(replies: Sequence[str], contexts: Sequence[Sequence[str]], min_n: int = 4) -> float:
    """Share of replies repeating a >= min_n character phrase of their own speaker's earlier turns."""
    if not replies:
        return 0.0
    return sum(repeated_phrase(r, c, min_n) is not None for r, c in zip(replies, contexts)) / len(replies)


# -- metrics ---------------------------------------------------------------------------------


def text_metrics(texts: Sequence[str], contexts: Sequence[Sequence[str]], min_n: int = 4) -> dict:
    """Length, distinct-1/2, repetition and self-repetition of one group of replies."""
    chars = [_chars(t) for t in texts]
    return {
        "avg_length": sum(map(len, chars)) / len(chars) if chars else 0.0,
        "distinct1": distinct_n(chars, 1),
        "distinct2": distinct_n(chars, 2),
        "repetition_rate": repetition_rate(list(texts)),
        "self_repetition": self_repetition_rate(texts, contexts, min_n),
    }


def turn_metrics(samples: Sequence[dict], min_n: int = 4, max_examples: int = 3) -> dict:
    """{"min_n", "buckets": {bucket: {"count", "model", "reference"}}, "all": {...}, "examples"}.
    An empty bucket has count 0 and None for model/reference. Examples: up to max_examples
    model replies that repeat their speaker, with the phrase and the turn it came from."""
    groups: dict[str, list[tuple[list[str], str, str]]] = {b: [] for b in BUCKETS}
    for s in samples:
        context = [str(t) for t in s["context"]]
        groups[turn_bucket(turn_index(context))].append((context, str(s["reply"]), str(s["reference"])))

    def summary(rows: list) -> dict:
        if not rows:
            return {"count": 0, "model": None, "reference": None}
        contexts = [r[0] for r in rows]
        return {"count": len(rows),
                "model": text_metrics([r[1] for r in rows], contexts, min_n),
                "reference": text_metrics([r[2] for r in rows], contexts, min_n)}

    examples = []
    for b in BUCKETS:
        for context, reply, _ in groups[b]:
            if len(examples) >= max_examples:
                break
            phrase = repeated_phrase(reply, context, min_n)
            if phrase and all(e["reply"] != reply for e in examples):
                earlier = next(t for t in own_turns(context) if phrase in "".join(_chars(t)))
                examples.append({"turn": b, "phrase": phrase, "reply": reply, "earlier_turn": earlier})
    return {"min_n": min_n, "buckets": {b: summary(groups[b]) for b in BUCKETS},
            "all": summary([r for b in BUCKETS for r in groups[b]]), "examples": examples}


def report_fields(samples: Sequence[dict], min_n: int = 4) -> dict:
    """What eval_report.json gets: the by_turn section and the overall self-repetition figures."""
    by_turn = turn_metrics(samples, min_n)
    a = by_turn["all"]
    return {"by_turn": by_turn,
            "self_repetition": a["model"]["self_repetition"] if a["count"] else 0.0,
            "self_repetition_reference": a["reference"]["self_repetition"] if a["count"] else 0.0}


# -- the picture and the Markdown --------------------------------------------------------------


def plot_turn_metrics(metrics: dict, png_path: str, title: str = "") -> str | None:
    """Five small panels (length, distinct-1, distinct-2, repetition, self-repetition) over the
    turn buckets, model against the human reference, and a sixth with the replies per bucket.
    Returns the path, or None when no bucket has a reply."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    buckets = metrics["buckets"]
    counts = [buckets[b]["count"] for b in BUCKETS]
    if not any(counts):
        return None
    x = list(range(len(BUCKETS)))
    panels = [("avg_length", "reply length (characters)"), ("distinct1", "distinct-1 (characters)"),
              ("distinct2", "distinct-2 (characters)"), ("repetition_rate", "repetition rate (3-gram twice)"),
              ("self_repetition", f"self-repetition ({metrics['min_n']}+ chars of own earlier turn)")]
    fig, axes = plt.subplots(2, 3, figsize=(11, 6), dpi=100)
    for ax, (key, label) in zip(axes.flat, panels):
        for side, style, name in (("model", "o-", "model"), ("reference", "s--", "human reference")):
            y = [buckets[b][side][key] if buckets[b]["count"] else math.nan for b in BUCKETS]
            ax.plot(x, y, style, label=name, linewidth=1.5)
        ax.set_title(label, fontsize=10)
        ax.set_xticks(x, BUCKETS)
        if key != "avg_length":
            ax.set_ylim(-0.03, 1.03)  # a margin so that points at 0 and 1 are not cut off
        else:
            ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=9)
    ax = axes.flat[5]
    ax.bar(x, counts, color="tab:gray")
    for i, c in zip(x, counts):
        ax.annotate(str(c), (i, c), ha="center", va="bottom", fontsize=9)
    ax.set_xticks(x, BUCKETS)
    ax.set_title("replies per bucket", fontsize=10)
    ax.set_ylim(0, max(counts) * 1.15)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3, axis="y")
    for ax in axes[1]:
        ax.set_xlabel("turn index of the reply (its speaker's n-th turn)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return png_path


def write_turn_plot(metrics: dict, dest: str, title: str = "") -> str | None:
    """plot_turn_metrics to a local path or a cloud URI (drawn locally, then uploaded, as
    the trainer does with the loss curve). Returns dest, or None with nothing to draw."""
    from zhchat.config import is_uri

    if not is_uri(dest):
        os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
        return plot_turn_metrics(metrics, dest, title)
    from zhchat.storage import upload

    with tempfile.TemporaryDirectory() as tmp:
        local = plot_turn_metrics(metrics, os.path.join(tmp, TURN_PNG), title)
        if local is None:
            return None
        upload(local, dest)
    return dest


def markdown_lines(report: dict) -> list[str]:
    """The report's "By turn" section: one row per bucket (model / human cells) and the PNG."""
    m = report.get("by_turn")
    if not m:
        return []
    cell = lambda row, key, fmt: "–" if not row["count"] else (  # noqa: E731
        f"{row['model'][key]:{fmt}} / {row['reference'][key]:{fmt}}")
    note = ("Turn index: the reply's place among its speaker's turns (1 + the context turns at the reply's "
            "parity; 4+ is turns 4 and later). Cells are model / human reference on the same samples. "
            f"Self-repetition: share of replies repeating a phrase of {m['min_n']}+ characters that the same "
            "speaker used earlier in the dialogue. Distinct-n falls with a bucket's size: compare within a row.")
    lines = ["## By turn", "", note,
             "", "| turn | replies | length | distinct-1 | distinct-2 | repetition | self-repetition |",
             "|---|---|---|---|---|---|---|"]
    for name, row in [*m["buckets"].items(), ("all", m["all"])]:
        lines.append(f"| {name} | {row['count']} | {cell(row, 'avg_length', '.1f')} | {cell(row, 'distinct1', '.3f')} "
                     f"| {cell(row, 'distinct2', '.3f')} | {cell(row, 'repetition_rate', '.3f')} "
                     f"| {cell(row, 'self_repetition', '.3f')} |")
    lines.append("")
    if report.get("turn_metrics_png"):
        lines += [f"![metrics by turn]({TURN_PNG})", ""]
    if m["examples"]:
        lines += ["Model replies repeating their speaker:", ""]
        one_line = lambda t: " ".join(str(t).split())  # noqa: E731
        lines += [f"- turn {e['turn']}: **{e['phrase']}** — reply: {one_line(e['reply'])} — "
                  f"earlier: {one_line(e['earlier_turn'])}" for e in m["examples"]]
        lines.append("")
    return lines
