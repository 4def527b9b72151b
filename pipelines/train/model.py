"""GPT-2 models: presets built from scratch, or a pretrained GPT-2 to fine-tune.

The vocabulary always comes from the tokenizer the shards were encoded with
(DATA/tokenizer); a pretrained model must share it, or training would silently learn
from ids that mean different strings to the model (the classic "garbled output" bug).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# n_layer x n_embd, n_head; parameter counts are for a vocabulary of 8,000 and 256 positions.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(n_layer=2, n_embd=64, n_head=2),          # tests: ~0.6M
    "small": dict(n_layer=4, n_embd=256, n_head=4),        # CPU quickstart: ~5.2M
    "gpt2": dict(n_layer=12, n_embd=768, n_head=12),       # GPT-2 124M shapes
    "gpt2-medium": dict(n_layer=24, n_embd=1024, n_head=16),  # GPT-2 355M shapes
}


# GPT-2's "gelu_new" is the tanh-approximated GELU written as six elementwise ops (pow, mul,
# add, tanh, ...), each a pass over [B, T, 4d] forward and again backward: 12% of a CPU
# training step of the small preset. torch's gelu(approximate="tanh") is the same function
# as one kernel (transformers' "gelu_pytorch_tanh"; vLLM serves it too).
FUSED_GELU = "gelu_pytorch_tanh"


class VocabMismatch(ValueError):
    """The pretrained model's tokenizer is not the one the training shards were encoded with."""


@dataclass(frozen=True)
class SpecialIds:
    eos: int
    pad: int

    @classmethod
    def of(cls, tokenizer) -> "SpecialIds":
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError("the tokenizer has no eos token; it must hold <|endoftext|>")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        return cls(eos=eos, pad=pad)


def build_model(preset: str, vocab_size: int, n_positions: int, ids: SpecialIds, dropout: float | None = None):
    """A randomly initialised GPT-2 of a preset size. Ids must lie inside the vocabulary."""
    from transformers import GPT2Config, GPT2LMHeadModel

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    for name, i in (("eos", ids.eos), ("pad", ids.pad)):
        if not 0 <= i < vocab_size:
            raise ValueError(f"{name} token id {i} is outside the vocabulary of {vocab_size}")
    p = dropout if dropout is not None else 0.0
    config = GPT2Config(
        vocab_size=vocab_size, n_positions=n_positions, **PRESETS[preset],
        resid_pdrop=p, embd_pdrop=p, attn_pdrop=p, activation_function=FUSED_GELU,
        bos_token_id=ids.eos, eos_token_id=ids.eos, pad_token_id=ids.pad, use_cache=False,
    )
    return GPT2LMHeadModel(config)


def check_same_vocab(data_tokenizer, model_tokenizer, data_dir: str, init_from: str) -> None:
    """Fail with a clear message when the shards' tokenizer differs from the pretrained one."""
    a, b = data_tokenizer.get_vocab(), model_tokenizer.get_vocab()
    if a == b:
        return
    only_data = [t for t in a if b.get(t) != a[t]][:5]
    raise VocabMismatch(
        f"vocabulary mismatch: the shards in {data_dir} were encoded with {data_dir}/tokenizer "
        f"({len(a):,} tokens), but --init-from {init_from} uses its own tokenizer ({len(b):,} tokens with the "
        f"dialogue tokens added); ids differ e.g. for {only_data!r}. Fine-tuning would train on the wrong ids. "
        f"Re-run preprocess with that tokenizer: `zhchat preprocess --tokenizer {init_from} ...`, "
        "or train from scratch with --preset instead of --init-from."
    )


def load_pretrained(init_from: str, tokenizer, n_positions: int, dropout: float | None = None):
    """A pretrained GPT-2 with embeddings resized to the tokenizer (dialogue tokens added)."""
    from transformers import AutoConfig, GPT2LMHeadModel

    try:
        config = AutoConfig.from_pretrained(init_from)
    except OSError as e:
        raise FileNotFoundError(f"cannot load a model config from --init-from {init_from!r}: {e}") from e
    if config.model_type != "gpt2":
        raise ValueError(f"--init-from {init_from!r} is a {config.model_type!r} model; only GPT-2 models are supported")
    if config.n_positions < n_positions:
        raise ValueError(
            f"--init-from {init_from!r} has {config.n_positions} positions but the shards use a context of "
            f"{n_positions}; re-run preprocess with --context-length {config.n_positions} or less"
        )
    overrides = {"use_cache": False}
    if config.activation_function == "gelu_new":
        overrides["activation_function"] = FUSED_GELU  # the same function, one kernel
    if dropout is not None:
        overrides.update(resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    # fp32 master weights whatever the checkpoint was saved in (transformers 5 loads the saved
    # dtype: a bf16 hub model would train in pure bf16, its updates lost to rounding).
    model = GPT2LMHeadModel.from_pretrained(init_from, dtype=torch.float32, **overrides)
    if model.get_input_embeddings().weight.shape[0] != len(tokenizer):
        # New rows (the dialogue tokens) start at the mean embedding, as transformers does.
        model.resize_token_embeddings(len(tokenizer))
    ids = SpecialIds.of(tokenizer)
    model.config.eos_token_id = model.config.bos_token_id = ids.eos
    model.config.pad_token_id = ids.pad
    return model


def load_training_model(path: str):
    """A zhchat checkpoint's model to resume training: fp32, no KV cache."""
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(path, dtype=torch.float32)
    model.config.use_cache = False
    return model


def count_params(model, non_embedding: bool = True) -> int:
    """Parameters; position embeddings excluded when non_embedding (token embeddings stay:
    they are the tied output layer, a real matmul)."""
    n = sum(p.numel() for p in model.parameters())
    if non_embedding:
        n -= model.transformer.wpe.weight.numel()
    return n


def flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the weights plus 12·L·d·T for attention (PaLM appendix B)."""
    c = model.config
    return 6 * count_params(model) + 12 * c.n_layer * c.n_embd * seq_len
