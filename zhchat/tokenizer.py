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
