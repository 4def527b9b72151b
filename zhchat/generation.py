"""Moved to the zhchat.engine package (issue 12). Kept only until zhchat/engine/vllm.py and
tests/test_vllm_engine.py import from zhchat.engine; then this file goes."""

from .checkpoints import local_checkpoint  # noqa: F401
from .engine.base import EngineClient, params_list  # noqa: F401
from .engine.detokenizer import Detokenizer as _Detokenizer  # noqa: F401
from .engine.local import Engine  # noqa: F401
from .engine.params import SamplingParams  # noqa: F401
from .engine.types import FINISH_LENGTH, FINISH_STOP, Completion, Delta, EngineError, PromptTooLong  # noqa: F401
