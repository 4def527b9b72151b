"""Loading tokenizers the same way for training, evaluation and serving.

Tokenizers are saved in the Hugging Face format beside every checkpoint, so
`AutoTokenizer.from_pretrained(dir)` loads them with no project code; this module only
adds the dialogue special tokens to pretrained tokenizers that lack them.
"""

from __future__ import annotations

from .dialogue import EOS, SPECIAL_TOKENS


def load_tokenizer(path_or_id: str, context_length: int | None = None):
    """A fast tokenizer from a local folder or hub id, with the dialogue tokens present."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path_or_id)
    except OSError as e:
        raise FileNotFoundError(f"cannot load a tokenizer from {path_or_id!r}: {e}") from e
    if not getattr(tok, "is_fast", False) or not hasattr(tok, "backend_tokenizer"):
        raise ValueError(f"tokenizer at {path_or_id!r} is not a fast (tokenizers-backed) tokenizer")
    add_dialogue_tokens(tok)
    # Byte-level decoding is exact; the "cleanup" would change spaces around punctuation.
    tok.clean_up_tokenization_spaces = False
    if context_length is not None:
        # The saved default is ~1e30; set it so truncation warnings mean something.
        tok.model_max_length = context_length
    return tok


def add_dialogue_tokens(tok) -> int:
    """Add missing dialogue special tokens (pretrained GPT-2 has only <|endoftext|>).

    Returns how many were added; the model's embeddings must then be resized.
    """
    missing = [t for t in SPECIAL_TOKENS if t not in tok.get_vocab()]
    added = tok.add_special_tokens({"additional_special_tokens": missing}) if missing else 0
    if tok.eos_token is None:
        tok.eos_token = EOS
    if tok.bos_token is None:
        tok.bos_token = EOS
    if tok.pad_token is None:
        tok.pad_token = EOS
    return added


# -- reading ids back as text -------------------------------------------------------------------

def is_wordpiece(tok) -> bool:
    """A BERT-style tokenizer (BertTokenizerFast: WordPiece over characters, [CLS]/[SEP]/[UNK]),
    as the Chinese GPT-2 checkpoints people fine-tune from ship (uer/gpt2-chinese-*,
    GPT2-chitchat)."""
    backend = getattr(tok, "backend_tokenizer", None)
    return backend is not None and type(backend.model).__name__ == "WordPiece"


def _latin(ch: str) -> bool:
    return ch.isascii() and ch.isalnum()


def decode(tok, ids) -> str:
    """Token ids as the text a reader expects, for every tokenizer zhchat loads.

    Byte-level BPE (zhchat's own, GPT-2's) decodes exactly. A WordPiece decoder puts a space
    between every pair of tokens, so Chinese comes out as "你 好 ！": here pieces are joined
    directly, "##" continuations glued on, and a space kept only between two Latin words or
    numbers ("hello world"); special tokens ([CLS], [SEP], [PAD], [MASK], the dialogue
    tokens) and [UNK] never reach the text."""
    ids = [int(i) for i in ids]
    if not is_wordpiece(tok):
        return tok.decode(ids, skip_special_tokens=True)
    hidden = set(tok.all_special_ids)
    if tok.unk_token_id is not None:
        hidden.add(tok.unk_token_id)
    out: list[str] = []
    for t in tok.convert_ids_to_tokens([i for i in ids if i not in hidden]):
        if t.startswith("##") and out:
            out.append(t[2:])
        elif out and _latin(out[-1][-1:]) and _latin(t[:1]):
            out.append(" " + t)
        else:
            out.append(t)
    return "".join(out)


def tokenizer_report(tok, texts, examples: int = 5) -> dict:
    """What a tokenizer cannot represent on a corpus: the unknown-token rate, and how often
    decode(encode(text)) differs from the text (a BERT vocabulary lower-cases, drops
    spaces between Chinese characters, maps rare characters to [UNK]), with examples."""
    unk = tok.unk_token_id
    tokens = unknown = changed = n = 0
    shown: list[dict] = []
    for text in texts:
        if not text:
            continue
        n += 1
        ids = tok.backend_tokenizer.encode(text, add_special_tokens=False).ids
        tokens += len(ids)
        unknown += sum(1 for i in ids if i == unk) if unk is not None else 0
        back = decode(tok, ids)
        if back != text:
            changed += 1
            if len(shown) < examples:
                shown.append({"text": text[:200], "decoded": back[:200]})
    return {"texts": n, "tokens": tokens, "unknown_tokens": unknown,
            "unknown_rate": unknown / tokens if tokens else 0.0,
            "round_trip_changed": changed, "round_trip_changed_rate": changed / n if n else 0.0,
            "examples": shown}
