"""Staleness: trainer version − oldest token version."""

from __future__ import annotations

from asyncrl.algo.staleness import is_trainable, staleness
from asyncrl.types import Sample


def test_staleness_is_trainer_version_minus_the_oldest_token_version():
    assert staleness([3, 4, 5], trainer_version=6) == 3
    assert staleness([6, 6], trainer_version=6) == 0
    assert staleness((2,), trainer_version=2) == 0


def test_a_sample_with_no_tokens_has_staleness_zero():
    assert staleness([], trainer_version=9) == 0
    assert is_trainable([], 9, max_staleness=0)


def test_partial_sample_resumed_after_weight_updates_is_as_stale_as_its_first_token():
    # Scenario: 2 tokens sampled at version 3, aborted, resumed for 2 more at version 5; the
    # trainer is at version 6. The oldest token sets the staleness: 6 − 3 = 3.
    sample = Sample(sample_id="s", prompt_id="p", prompt_ids=[1], max_new_tokens=8)
    for token, version in ((10, 3), (11, 3), (12, 5), (13, 5)):
        sample.append(token, logprob=-0.1, version=version)
    assert staleness(sample.token_versions, trainer_version=6) == 3
    assert not is_trainable(sample.token_versions, 6, max_staleness=2)
    assert is_trainable(sample.token_versions, 6, max_staleness=3)


def test_is_trainable_admits_staleness_up_to_and_including_the_bound():
    # η = 1: tokens of version 5 or 6 may train at version 6, version 4 may not.
    assert is_trainable([5, 6], 6, max_staleness=1)
    assert not is_trainable([4, 6], 6, max_staleness=1)


def test_max_staleness_zero_is_synchronous_training():
    assert is_trainable([7, 7], 7, max_staleness=0)
    assert not is_trainable([6, 7], 7, max_staleness=0)
