"""Shared pieces of the config schema."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict

URI_SCHEMES = ("s3://", "gs://", "gcs://", "abfs://", "hf://", "http://", "https://", "memory://", "file://")


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def is_uri(path: str) -> bool:
    return path.startswith(URI_SCHEMES)


def existing_path(value: str, what: str = "path") -> str:
    """Validate that a local path exists (cloud URIs are checked when they are opened)."""
    if not is_uri(value) and not Path(value).expanduser().exists():
        raise ValueError(f"{what} does not exist: {value}")
    return value
