"""Staleness: how many policy versions a sample lags the trainer. Computed only here."""

from __future__ import annotations

from collections.abc import Sequence


def staleness(token_versions: Sequence[int], trainer_version: int) -> int:
    """trainer_version − oldest token version; a sample with no tokens has staleness 0."""
    return trainer_version - min(token_versions) if len(token_versions) else 0


def is_trainable(token_versions: Sequence[int], trainer_version: int, max_staleness: int) -> bool:
    return staleness(token_versions, trainer_version) <= max_staleness
