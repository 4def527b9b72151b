"""Progress and end-of-stage summaries on the terminal."""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

from rich.console import Console
from rich.table import Table

console = Console(stderr=True)


def summary_table(title: str, columns: Sequence[str], rows: Iterable[Sequence]) -> None:
    """Print a table of counts (per file, per rule, per split ...) to stderr."""
    t = Table(title=title, title_justify="left")
    for c in columns:
        # fold rather than truncate: file paths in the first column must stay readable
        t.add_column(str(c), justify="right" if c != columns[0] else "left", overflow="fold")
    for r in rows:
        t.add_row(*[f"{v:,}" if isinstance(v, int) else (f"{v:.4g}" if isinstance(v, float) else str(v)) for v in r])
    console.print(t)


def kv_table(title: str, values: Mapping[str, object]) -> None:
    summary_table(title, ["what", "value"], values.items())


def say(msg: str) -> None:
    console.print(msg)
