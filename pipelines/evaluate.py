"""`zhchat eval`: perplexity against a unigram baseline, BLEU, distinct-n and sample replies.

- perplexity = exp(total NLL / total loss tokens) over the whole test split: token-weighted,
  never a mean of per-example perplexities. Loss tokens are the shifted labels != -100,
  the same tokens training scores.
- unigram_perplexity: the same test tokens under unigram probabilities counted on the train
  split's loss tokens with add-one smoothing over the vocabulary. A model that does not beat
  it has learned nothing beyond token frequencies.
- Replies are generated for test dialogues (context = every turn but the last, reference =
  the last) by the shared engine (zhchat.engine, `eval.engine`); BLEU-2/4 with sacrebleu on characters
  (tokenize="zh") and on jieba words; distinct-1/2 over characters (unique n-grams / all
  n-grams across replies, 0..1); average length; repetition rate (share of replies in which
  some character 3-gram occurs twice).

Scoring and generation run on Ray Data actors that load the model once each.
The report is saved beside the checkpoint as eval_report.json and eval_report.md.
Metrics by turn index and self-repetition: pipelines/turn_metrics.py (turn_metrics.png beside them).
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from typing import Sequence

import numpy as np

from zhchat.config import RunConfig
from zhchat.dialogue import IGNORE_INDEX
from zhchat.report import kv_table, say

REPORT_JSON = "eval_report.json"
REPORT_MD = "eval_report.md"


# -- plain functions ------------------------------------------------------------------------------


def score_batch(model, batch: dict, pad_id: int, device: str = "cpu", amp_dtype=None) -> dict:
    """Per row: summed next-token NLL over loss tokens and how many there were (forward under
    autocast when amp_dtype is set, the training rule's dtype; the loss itself in fp32)."""
    import contextlib

    import torch
    import torch.nn.functional as F

    from pipelines.train.data import collate

    b = collate(batch, pad_id)
    ids = torch.from_numpy(b["input_ids"]).to(device)        # [B, T]
    labels = torch.from_numpy(b["labels"]).to(device)         # [B, T]
    target = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], 1)
    amp = torch.autocast(torch.device(device).type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    with torch.no_grad(), amp:
        logits = model(input_ids=ids).logits.float()          # [B, T, V]
        nll = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=IGNORE_INDEX, reduction="none")  # [B, T]
    return {"nll": nll.sum(1).double().cpu().numpy(), "tokens": (target != IGNORE_INDEX).sum(1).cpu().numpy()}


def perplexity(nll_sum: float, tokens: int) -> float:
    """exp of the token-weighted mean NLL."""
    if tokens <= 0:
        raise ValueError("no loss tokens to score: the test split is empty or has no reply tokens")
    return math.exp(nll_sum / tokens)


def label_counts(batch: dict, vocab_size: int) -> dict:
    """Counts of each loss token (shifted labels != -100) in a batch: one row, a [V] vector."""
    rows = [np.asarray(x[1:], dtype=np.int64) for x in batch["labels"]]
    t = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    t = t[t != IGNORE_INDEX]
    if len(t) and (t.max() >= vocab_size or t.min() < 0):
        raise ValueError(f"label id {int(t.max())} is outside the vocabulary of {vocab_size}")
    return {"counts": np.bincount(t, minlength=vocab_size)[None, :]}


def unigram_perplexity(train_counts: np.ndarray, test_counts: np.ndarray) -> float:
    """Add-one smoothed unigram model from train counts, scored on test counts."""
    v = len(train_counts)
    logp = np.log(train_counts + 1.0) - math.log(train_counts.sum() + v)
    n = int(test_counts.sum())
    if n == 0:
        raise ValueError("no loss tokens in the test split")
    return math.exp(-float((test_counts * logp).sum()) / n)


def ngrams(seq: Sequence, n: int) -> list[tuple]:
    return [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]


def distinct_n(texts: Sequence[Sequence], n: int) -> float:
    """Unique n-grams / all n-grams over every reply (0 when there are none)."""
    grams = [g for t in texts for g in ngrams(list(t), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition_rate(texts: Sequence[str], n: int = 3) -> float:
    """Share of replies in which some character n-gram occurs at least twice."""
    if not texts:
        return 0.0
    rep = sum(1 for t in texts if any(c > 1 for c in Counter(ngrams(_chars(t), n)).values()))
    return rep / len(texts)


def _chars(text: str) -> list[str]:
    return [c for c in text if not c.isspace()]


def reply_metrics(hyps: Sequence[str], refs: Sequence[str]) -> dict:
    """BLEU-2/4 (characters and jieba words), distinct-1/2, lengths, repetition rate."""
    import jieba
    from sacrebleu.metrics import BLEU

    words = lambda ts: [" ".join(w for w in jieba.lcut(t) if w.strip()) for t in ts]  # noqa: E731
    hw, rw = words(hyps), words(refs)
    out = {
        "bleu2": BLEU(tokenize="zh", max_ngram_order=2).corpus_score(list(hyps), [list(refs)]).score,
        "bleu4": BLEU(tokenize="zh", max_ngram_order=4).corpus_score(list(hyps), [list(refs)]).score,
        "bleu2_words": BLEU(tokenize="none", max_ngram_order=2).corpus_score(hw, [rw]).score,
        "bleu4_words": BLEU(tokenize="none", max_ngram_order=4).corpus_score(hw, [rw]).score,
        "distinct1": distinct_n([_chars(t) for t in hyps], 1),
        "distinct2": distinct_n([_chars(t) for t in hyps], 2),
        "distinct1_words": distinct_n([t.split() for t in hw], 1),
        "distinct2_words": distinct_n([t.split() for t in hw], 2),
        "avg_length": float(np.mean([len(_chars(t)) for t in hyps])) if hyps else 0.0,
        "avg_reference_length": float(np.mean([len(_chars(t)) for t in refs])) if refs else 0.0,
        "repetition_rate": repetition_rate(hyps),
        "empty_replies": sum(1 for t in hyps if not t.strip()),
    }
    return out


def reply_samples(rows: Sequence[dict], limit: int) -> tuple[list[dict], int]:
    """(samples, skipped): context = all turns but the last, reference = the last turn.
    Dialogues with fewer than two turns have no context and are counted as skipped."""
    samples, skipped = [], 0
    for r in rows:
        turns = [t for t in (r.get("turns") or [])]
        if len(turns) < 2:
            skipped += 1
            continue
        samples.append({"idx": len(samples), "context": turns[:-1], "reference": turns[-1], "system": r.get("system") or ""})
        if len(samples) >= limit:
            break
    return samples, skipped


# -- Ray Data actors (thin wrappers) ----------------------------------------------------------


class NLLScorer:
    def __init__(self, model_path: str, threads: int = 1, precision: str = "auto"):
        import torch
        from transformers import AutoModelForCausalLM

        from zhchat.checkpoints import local_checkpoint
        from zhchat.runtime import autocast_dtype, best_device

        torch.set_num_threads(threads)
        self.device = best_device()
        self.amp_dtype = autocast_dtype(self.device, precision)  # the training rule: bf16/fp16 on GPUs
        local = local_checkpoint(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(local, dtype=torch.float32).to(self.device).eval()
        self.pad_id = self.model.config.pad_token_id if self.model.config.pad_token_id is not None else 0

    def __call__(self, batch: dict) -> dict:
        return score_batch(self.model, batch, self.pad_id, self.device, self.amp_dtype)


class ReplyGenerator:
    def __init__(self, model_path: str, params: dict, threads: int = 1, engine: str = "zhchat",
                 batch_size: int = 16):
        import torch

        from zhchat.engine import SamplingParams, open_engine

        torch.set_num_threads(threads)
        self.engine = open_engine(model_path, engine=engine, max_batch_size=batch_size, threads=threads)
        self.params = SamplingParams(**params)

    def __call__(self, batch: dict) -> dict:
        from zhchat.dialogue import PromptTooLong, messages_from_turns

        convs, ok = [], []
        for context, system in zip(batch["context"], batch["system"]):
            turns = list(context) + [""]  # the reply slot makes the roles come out right
            msgs = messages_from_turns(turns, str(system) or None)[:-1]
            try:
                self.engine.chat_prompt(msgs, self.params.max_tokens)
                convs.append(msgs)
                ok.append(True)
            except (PromptTooLong, ValueError):
                ok.append(False)
        replies = iter(self.engine.chat_batch(convs, self.params) if convs else [])
        batch["reply"] = np.array([next(replies) if good else "" for good in ok], dtype=object)
        batch["generated"] = np.array(ok)
        return batch


# -- the stage ---------------------------------------------------------------------------------


def _read_segmented_test(data_dir: str, limit: int) -> list[dict]:
    """Test dialogues in file order (deterministic), enough to find `limit` samples."""
    import pyarrow.dataset as pads

    from pipelines.train.data import split_dir
    from zhchat.storage import filesystem

    path = split_dir(data_dir, "test", "segmented")
    fs, p = filesystem(path)
    try:
        ds = pads.dataset(p, filesystem=fs, format="parquet")
    except (FileNotFoundError, OSError) as e:
        raise FileNotFoundError(f"{path} is missing; re-run `zhchat preprocess`") from e
    rows: list[dict] = []
    for frag in sorted(ds.get_fragments(), key=lambda f: f.path):
        rows += frag.to_table(columns=["turns", "system"]).to_pylist()
        if len(rows) >= 4 * limit:
            break
    return rows


def _check_vocab(model_dir: str, data_dir: str) -> int:
    from zhchat.storage import join, local_copy
    from zhchat.tokenizer import load_tokenizer

    data_tok = load_tokenizer(local_copy(join(data_dir, "tokenizer")))
    model_tok = load_tokenizer(model_dir)
    if data_tok.get_vocab() != model_tok.get_vocab():
        raise ValueError(
            f"the model at {model_dir} was trained with another tokenizer ({len(model_tok):,} tokens) than the one "
            f"{data_dir} was encoded with ({len(data_tok):,} tokens): perplexity on these shards would be meaningless. "
            "Evaluate on data preprocessed with the model's tokenizer.")
    return len(model_tok)


def eval_gpus(choice: str, cluster_gpus: float) -> tuple[int, int]:
    """(GPUs per model actor, most actors): one GPU each, and never more actors than the
    cluster has GPUs, or the extra actors would wait forever for a GPU. "auto" uses GPUs
    when the cluster has some now; "yes" also on a cluster whose GPU nodes are not up yet
    (one actor then: the autoscaler starts one node for it)."""
    if choice == "no" or (choice == "auto" and cluster_gpus < 1):
        return 0, 1 << 30
    return 1, max(1, int(cluster_gpus))


def evaluate(cfg: RunConfig) -> dict:
    import ray
    import ray.data

    from pipelines.train.data import read_split
    from pipelines.train.trainer import quiet_data
    from zhchat.checkpoints import local_checkpoint, resolve_checkpoint
    from zhchat.runtime import cluster_cpus, init_ray

    e = cfg.eval
    if not e.model or not e.data:
        raise ValueError("eval needs --model (a checkpoint or run folder) and --data (the preprocess output)")
    init_ray(cfg.ray)
    ckpt = resolve_checkpoint(e.model)
    local = local_checkpoint(ckpt)
    vocab = _check_vocab(local, e.data)
    gpus, max_actors = eval_gpus(e.use_gpu, ray.cluster_resources().get("GPU", 0))
    actors = min(e.actors or max(1, min(4, cluster_cpus() // 2)), max_actors)
    threads = max(1, int(e.cpus_per_actor))
    pool = dict(compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=e.cpus_per_actor, num_gpus=gpus,
                batch_size=e.batch_size)
    say(f"[bold]eval:[/] {ckpt} on {e.data} with {actors} model actor(s)")

    with quiet_data():
        # Perplexity: per-row NLL sums and token counts, summed here.
        scored = read_split(e.data, "test", min_blocks=actors).map_batches(
            NLLScorer, fn_constructor_kwargs={"model_path": ckpt, "threads": threads, "precision": e.precision},
            batch_format="numpy", **pool)
        nll_sum, tokens = 0.0, 0
        for b in scored.iter_batches(batch_size=4096, batch_format="numpy"):
            nll_sum += float(b["nll"].sum())
            tokens += int(b["tokens"].sum())
        ppl = perplexity(nll_sum, tokens)

        train_counts = split_label_counts(e.data, "train", vocab)
        test_counts = split_label_counts(e.data, "test", vocab)
        uni = unigram_perplexity(train_counts, test_counts)

        samples, skipped_short = reply_samples(_read_segmented_test(e.data, e.max_samples), e.max_samples)
        params = e.sampling()  # the sampling schema's fields (zhchat/engine/params.py)
        generated: list[dict] = []
        if samples:
            gen_ds = ray.data.from_items(samples).map_batches(
                ReplyGenerator, fn_constructor_kwargs={"model_path": ckpt, "params": params, "threads": threads,
                                                      "engine": e.engine, "batch_size": e.batch_size},
                batch_format="numpy", **pool)
            generated = sorted(gen_ds.take_all(), key=lambda r: r["idx"])
    done = [g for g in generated if g["generated"]]
    report = {
        "model": ckpt, "data": e.data,
        "perplexity": ppl, "unigram_perplexity": uni, "tokens": tokens, "nll_per_token": nll_sum / tokens,
        **reply_metrics([g["reply"] for g in done], [g["reference"] for g in done]),
        "samples": len(done), "skipped_prompt_too_long": len(generated) - len(done),
        "skipped_single_turn": skipped_short, "sampling": params,
    }
    from pipelines.turn_metrics import report_fields  # by_turn, self_repetition(_reference)

    report.update(report_fields(done))
    report_path = _save_report(ckpt, report, generated[: e.show_samples])
    report["report_path"] = report_path
    kv_table("eval", {k: report[k] for k in ("perplexity", "unigram_perplexity", "tokens", "bleu2", "bleu4",
                                             "bleu2_words", "bleu4_words", "distinct1", "distinct2", "avg_length",
                                             "repetition_rate", "self_repetition", "samples")}
             | {"report": report_path, "by-turn plot": report["turn_metrics_png"]})
    return report


def split_label_counts(data_dir: str, split: str, vocab: int) -> np.ndarray:
    """label_counts over a whole split, streamed record batch by record batch in this process
    (a bincount runs at memory speed; shipping it to Ray would cost more than it saves)."""
    import pyarrow.dataset as pads

    from pipelines.train.data import split_dir
    from zhchat.storage import filesystem

    fs, p = filesystem(split_dir(data_dir, split))
    total = np.zeros(vocab, dtype=np.int64)
    for rb in pads.dataset(p, filesystem=fs, format="parquet").to_batches(columns=["labels"]):
        total += label_counts({"labels": rb.column(0).to_numpy(zero_copy_only=False)}, vocab)["counts"][0]
    return total


def markdown_report(report: dict, samples: Sequence[dict]) -> str:
    f = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = [f"# Evaluation of `{report['model']}`", "", f"Data: `{report['data']}`", "",
             "| metric | value |", "|---|---|"]
    for k in ("perplexity", "unigram_perplexity", "tokens", "bleu2", "bleu4", "bleu2_words", "bleu4_words",
              "distinct1", "distinct2", "distinct1_words", "distinct2_words", "avg_length", "avg_reference_length",
              "repetition_rate", "empty_replies", "samples", "skipped_prompt_too_long", "skipped_single_turn"):
        lines.append(f"| {k} | {f(report[k])} |")
    if "self_repetition" in report:
        lines.append(f"| self_repetition (model / human) | {f(report['self_repetition'])} / "
                     f"{f(report['self_repetition_reference'])} |")
    lines += ["", "Perplexity is exp of the token-weighted mean NLL over the whole test split; the unigram "
              "baseline uses add-one smoothed train-split token frequencies on the same tokens. BLEU is on a "
              "0–100 scale (sacrebleu), distinct-n a 0–1 ratio over characters.", "",
              f"Sampling: `{json.dumps(report['sampling'])}`", "", "## Sample dialogues", ""]
    from pipelines.turn_metrics import markdown_lines

    at = lines.index("## Sample dialogues")
    lines[at:at] = markdown_lines(report)  # the "By turn" section, before the samples
    for i, s in enumerate(samples, 1):
        lines.append(f"### {i}")
        for j, turn in enumerate(s["context"]):
            who = "用户" if (len(s["context"]) - 1 - j) % 2 == 0 else "助手"
            lines.append(f"- **{who}**: {turn}")
        lines.append(f"- **参考回复**: {s['reference']}")
        lines.append(f"- **模型回复**: {s['reply'] if s['generated'] else '(prompt too long, skipped)'}")
        lines.append("")
    return "\n".join(lines)


def _save_report(ckpt: str, report: dict, samples: Sequence[dict]) -> str:
    """Writes eval_report.json/.md and, from report["by_turn"], turn_metrics.png beside them
    (report["turn_metrics_png"]: its path, None when there was nothing to draw)."""
    from pipelines.turn_metrics import TURN_PNG, write_turn_plot
    from zhchat.storage import join, write_text

    path = join(ckpt, REPORT_JSON)
    title = "/".join(ckpt.rstrip("/").replace(os.sep, "/").split("/")[-2:])
    report["turn_metrics_png"] = (write_turn_plot(report["by_turn"], join(ckpt, TURN_PNG), title=title)
                                  if report.get("by_turn") else None)
    clean = [{"context": list(s["context"]), "reference": s["reference"], "reply": s["reply"],
              "generated": bool(s["generated"])} for s in samples]
    write_text(path, json.dumps({**report, "sample_dialogues": clean}, ensure_ascii=False, indent=1, default=str))
    write_text(join(ckpt, REPORT_MD), markdown_report(report, clean))
    return path


def run_eval(cfg: RunConfig, args) -> dict:
    return evaluate(cfg)
