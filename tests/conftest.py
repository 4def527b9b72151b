"""Shared fixtures: one local Ray cluster per test session, tiny real tokenizers and models.

Tiny objects are real (a BPE trained here, a GPT-2 built from a config), never mocks.
"""

from __future__ import annotations

import os
import random
import socket

import pytest

# Workers and replicas must find the project's packages: an installed package does that,
# and so does PYTHONPATH for a plain checkout.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ["PYTHONPATH"] = _ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# What zhchat's own local clusters use (RayConfig.serve_throughput_optimized), so the Serve
# tests run the mode users get.
from zhchat.runtime import high_throughput_serve_env  # noqa: E402

for _key, _value in high_throughput_serve_env().items():
    os.environ.setdefault(_key, _value)


def free_port() -> int:
    """A free port on 127.0.0.1 for a server a test starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def own_cluster_env(**extra: str) -> dict[str, str]:
    """The environment of a child process that starts a Ray cluster of its own: not this
    session's RAY_ADDRESS nor another running cluster, and HAProxy files and ports of its own (two HAProxies cannot
    bind the same ports, and this session's cluster may be serving)."""
    # "local": a cluster of its own even while another test's simulated cluster
    # (ray.cluster_utils.Cluster records itself in /tmp/ray like `ray start`) is up, which
    # zhchat would otherwise join (zhchat.runtime.running_cluster_address).
    env = {**os.environ, **high_throughput_serve_env(), "RAY_ADDRESS": "local", **extra}
    return env


SAMPLE_TEXTS = [
    "你好，今天天气怎么样？", "今天天气很好，我们去公园散步吧。", "好啊，几点出发？", "下午三点吧。",
    "你吃饭了吗？", "还没有，一起去吃火锅吧。", "我喜欢看电影，你呢？", "我也喜欢，最近有什么好看的电影？",
    "周末你打算做什么？", "我想在家看书，然后做饭。", "明天要下雨，记得带伞。", "谢谢你提醒我。",
    "Hello 世界 123 😀 𠀀 ok", "北京的秋天特别美。", "上海的小笼包很好吃。", "我们一起学习中文吧！",
]


def make_dialogues(n: int = 200, seed: int = 0) -> list[list[str]]:
    """Small varied multi-turn dialogues for tests (deterministic)."""
    rng = random.Random(seed)
    return [[rng.choice(SAMPLE_TEXTS) for _ in range(rng.randint(2, 5))] for _ in range(n)]


@pytest.fixture(scope="session")
def ray_cluster():
    """One local cluster for the session. 4 logical CPUs on a 2-core machine so that a
    trainer, its Ray Data inputs and Serve replicas can be scheduled side by side."""
    import ray

    if not ray.is_initialized():
        # address="local": always a new cluster, even if a `ray start` head left its address
        # in /tmp/ray (test_submit starts one).
        ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="WARNING")
    yield ray
    # Left running until the interpreter exits: other session fixtures may still need it.


def build_tiny_tokenizer(out_dir: str, vocab_size: int = 600):
    """A real byte-level BPE with the dialogue special tokens, saved in the HF format."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from zhchat.dialogue import EOS, SPECIAL_TOKENS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(SAMPLE_TEXTS * 20, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS,
                                 additional_special_tokens=SPECIAL_TOKENS[1:], model_max_length=128)
    hf.save_pretrained(out_dir)
    return hf


def build_tiny_model(out_dir: str, tokenizer, n_positions: int = 128):
    """A tiny GPT-2 (2 layers, 64 wide) saved with its tokenizer, as a checkpoint is."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tokenizer), n_positions=n_positions, n_embd=64, n_layer=2, n_head=2,
                     bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.eos_token_id)
    model = GPT2LMHeadModel(cfg)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return model


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_tokenizer")
    build_tiny_tokenizer(str(d))
    return str(d)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("tiny_model")
    build_tiny_model(str(d), AutoTokenizer.from_pretrained(tiny_tokenizer_dir))
    return str(d)
