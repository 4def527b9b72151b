"""Train/validation/test split by a salted hash of the dialogue id.

The hash is blake2b (never Python's `hash()`, which is salted per process), so a dialogue
lands in the same split on every run, on every worker and on every machine; adding data
does not move old dialogues between splits. Dialogue ids are content hashes
(zhchat.tables.dialogue_id), so an exact duplicate that survives dedup still lands in the
same split as its twin and cannot leak from train into test.
"""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

from zhchat.config import SplitConfig

from .clean import _column, with_columns

SPLITS = ("train", "validation", "test")


def split_fraction(salt: str, dialogue_id: str) -> float:
    """A uniform number in [0, 1) fixed by (salt, id)."""
    digest = hashlib.blake2b(f"{salt}\x00{dialogue_id}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def assign_split(ids: Sequence[str], cfg: SplitConfig) -> list[str]:
    """"train", "validation" or "test" per id. Test takes the lowest `cfg.test` of the hash
    range and validation the next `cfg.validation`, so changing one fraction never moves a
    dialogue between the other two."""
    out = []
    for i in ids:
        if i is None or i == "":
            raise ValueError("split: a dialogue without an id cannot be assigned a split")
        u = split_fraction(cfg.salt, str(i))
        out.append("test" if u < cfg.test else "validation" if u < cfg.test + cfg.validation else "train")
    return out


def split_batch(batch: Any, cfg: SplitConfig) -> Any:
    """The batch (pyarrow Table or dict of columns) with a `split` column added."""
    return with_columns(batch, {"split": assign_split(_column(batch, "id"), cfg)})
