"""Staleness: how many policy versions a sample lags the trainer. Computed only here.

A sample's staleness is set by its oldest token: a partial sample resumed after a weight update
carries tokens of several versions (asyncrl.types.Sample.token_versions), and the oldest one
bounds how off-policy the sample is.
"""

from __future__ import annotations

from collections.abc import Sequence


def staleness(token_versions: Sequence[int], trainer_version: int) -> int:
    """trainer_version − min(token_versions); a sample with no tokens has staleness 0.

    Args:
        token_versions: the policy version of each response token (a Sample's list, not the
            -1-padded TrainBatch row).
        trainer_version: the version of the policy about to be trained.

    Returns:
        The number of versions the oldest token lags (0 when on-policy).
    """
    if len(token_versions) == 0:
        return 0
    return int(trainer_version - min(token_versions))


def is_trainable(token_versions: Sequence[int], trainer_version: int, max_staleness: int) -> bool:
    """Whether the sample may still be trained: staleness(...) <= max_staleness (η).

    max_staleness = 0 is synchronous training: only samples whose every token came from the
    current trainer version pass.
    """
    return staleness(token_versions, trainer_version) <= max_staleness
