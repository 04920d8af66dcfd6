"""GroupBuffer: the DataManager's state machine, staleness rules and exactly-once ledger."""

from __future__ import annotations

import pickle

from asyncrl.data.buffer import GroupBuffer
from asyncrl.types import FinishReason, Prompt, Reward, Sample


def _prompt(i: int) -> Prompt:
    return Prompt(prompt_id=f"p{i}", text=f"q{i}", input_ids=[1, 2], answer="a")


def _samples(prompt: Prompt, n: int) -> list[Sample]:
    return [Sample(sample_id=f"{prompt.prompt_id}/{k}", prompt_id=prompt.prompt_id,
                   prompt_ids=prompt.input_ids, max_new_tokens=4) for k in range(n)]


def _finish(s: Sample, version: int, reward: float, tokens: int = 2) -> Sample:
    for _ in range(tokens):
        s.append(7, -0.5, version)
    s.finish_reason = FinishReason.STOP
    s.reward = Reward(value=reward)
    return s


def _abort(s: Sample, version: int, tokens: int = 1) -> Sample:
    for _ in range(tokens):
        s.append(7, -0.5, version)
    s.finish_reason = FinishReason.ABORT
    return s


def _balanced(buf: GroupBuffer) -> dict[str, int]:
    """The ledger balances, no id was started or settled twice, and recounting the per-id
    fates gives the same numbers as the counters."""
    ledger = buf.ledger()
    assert ledger["balance"] == 0, ledger
    assert ledger.pop("duplicates") == 0
    counters = {k: v for k, v in ledger.items() if k not in ("balance", "resumed")}
    assert buf.fate_counts() == counters
    assert buf.prompt_fates() == _prompt_fates_recounted(buf)
    return ledger


def _prompt_fates_recounted(buf: GroupBuffer) -> dict[str, str]:
    """Each prompt's fate recounted from its samples' fates in the ledger rows (the buffer
    keeps them as events happen): trained if a sample was; pending if one is, or if the last
    attempt went stale (the prompt is re-queued); skipped if it has none; else its last drop."""
    out = {}
    for row in buf.ledger_entries():
        fates = list(row["samples"].values())
        trained = [f for f in fates if f.startswith("trained@")]
        if trained:
            out[row["prompt_id"]] = trained[0]
        elif "pending" in fates or (fates and fates[-1] == "dropped:stale"):
            out[row["prompt_id"]] = "pending"
        else:
            out[row["prompt_id"]] = fates[-1] if fates else row["fate"]
    return out


def test_complete_groups_become_a_batch_and_the_ledger_balances():
    buf = GroupBuffer(group_size=2, max_staleness=0, drop_all_equal=False)
    for i in range(3):
        p = _prompt(i)
        samples = _samples(p, 2)
        buf.start_group(p, samples)
        buf.add([_finish(samples[0], 0, 1.0), _finish(samples[1], 0, 0.0)])
    assert _balanced(buf) == {"started": 6, "trained": 0, "pending": 6, "balance": 0,
                              "resumed": 0}
    assert buf.pop_batch(4, trainer_version=0) is None  # only 3 ready
    batch = buf.pop_batch(2, trainer_version=0)
    assert [g.prompt.prompt_id for g in batch] == ["p0", "p1"]  # FIFO
    assert _balanced(buf)["trained"] == 4
    assert buf.active_groups == 3  # 1 ready + 2 in a batch whose weights are not out yet
    buf.release_batch(2)
    assert buf.active_groups == 1


def test_group_older_than_eta_is_dropped_with_a_reason_and_its_prompt_requeued():
    # Group generated at version 0; the trainer is at version 2 with η = 1: staleness 2 > 1.
    buf = GroupBuffer(group_size=2, max_staleness=1, drop_all_equal=False)
    p = _prompt(0)
    samples = _samples(p, 2)
    buf.start_group(p, samples)
    buf.add([_finish(samples[0], 0, 1.0), _finish(samples[1], 1, 0.0)])
    assert buf.pop_batch(1, trainer_version=2) is None
    assert buf.dropped == {"stale": 2}
    requeued = buf.take_requeued()
    assert (requeued.prompt_id, requeued.text, requeued.attempt) == ("p0", "q0", 1)
    _balanced(buf)


def test_staleness_uses_the_oldest_token_of_any_sample_in_the_group():
    buf = GroupBuffer(group_size=2, max_staleness=1, drop_all_equal=False)
    p = _prompt(0)
    a, b = _samples(p, 2)
    buf.start_group(p, [a, b])
    a.append(7, -0.1, 0)  # one old token, then newer ones
    buf.add([_finish(a, 1, 1.0), _finish(b, 1, 0.0)])
    assert buf.pop_batch(1, trainer_version=1) is not None  # staleness 1 ≤ η
    buf2 = GroupBuffer(group_size=2, max_staleness=1, drop_all_equal=False)
    c, d = _samples(p, 2)
    buf2.start_group(p, [c, d])
    c.append(7, -0.1, 0)
    buf2.add([_finish(c, 2, 1.0), _finish(d, 2, 0.0)])
    assert buf2.pop_batch(1, trainer_version=2) is None  # oldest token 0: staleness 2 > η


def test_dynamic_sampling_drops_all_equal_groups_and_failed_rewards_are_dropped_not_zeroed():
    buf = GroupBuffer(group_size=2, max_staleness=0, drop_all_equal=True)
    p0, p1 = _prompt(0), _prompt(1)
    s0, s1 = _samples(p0, 2), _samples(p1, 2)
    buf.start_group(p0, s0)
    buf.start_group(p1, s1)
    buf.add([_finish(s0[0], 0, 1.0), _finish(s0[1], 0, 1.0)])
    failed = _finish(s1[1], 0, 0.0)
    failed.reward = Reward.failed("timeout")
    buf.add([_finish(s1[0], 0, 1.0), failed])
    assert buf.dropped == {"all_equal_reward": 2, "reward_failed": 2}
    assert buf.ready_groups == 0 and buf.active_groups == 0
    _balanced(buf)


def test_partials_are_resumed_and_hopeless_ones_replaced_by_fresh_samples():
    buf = GroupBuffer(group_size=2, max_staleness=1, drop_all_equal=False)
    p = _prompt(0)
    a, b = _samples(p, 2)
    buf.start_group(p, [a, b])
    buf.add([_abort(a, 0), _abort(b, 1)])
    assert buf.partial_count == 2
    # Trainer at version 2: a (oldest token 0) can never be trained within η = 1; b can.
    (resumed,) = buf.take_partials(trainer_version=2)
    ids = sorted(s.sample_id for s in resumed)
    assert ids == ["p0/0#0", "p0/1"]
    fresh = next(s for s in resumed if s.sample_id == "p0/0#0")
    assert fresh.response_ids == [] and fresh.token_versions == []
    kept = next(s for s in resumed if s.sample_id == "p0/1")
    assert kept.token_versions == [1]  # continues from its tokens
    assert buf.dropped == {"stale_partial": 1}
    assert _balanced(buf)["started"] == 3
    assert buf.ledger()["resumed"] == 1  # the kept one; the replaced one starts afresh
    buf.add([_finish(fresh, 2, 1.0), _finish(kept, 2, 0.0)])
    assert buf.ready_groups == 1
    _balanced(buf)


def test_a_stale_multi_turn_partial_is_replaced_by_a_fresh_episode_of_the_same_game():
    from asyncrl.types import new_episode

    buf = GroupBuffer(group_size=1, max_staleness=0, drop_all_equal=False)
    p = _prompt(0)
    (s,) = _samples(p, 1)
    s.episode = new_episode({"secret": 7, "guesses": []})
    buf.start_group(p, [s])
    s.episode["state"]["guesses"].append(3)  # mid-episode: a turn done, its state moved on
    s.episode["turns"], s.episode["turn_start"] = 1, 2
    buf.add([_abort(s, 0, tokens=3)])
    (fresh,) = buf.take_partials(trainer_version=1)[0]
    assert fresh.sample_id == "p0/0#0" and fresh.response_ids == []
    # still an episode (not a single-turn answer), from its first turn and initial state
    assert fresh.episode == new_episode({"secret": 7, "guesses": []})
    fresh.episode["state"]["guesses"].append(1)
    assert fresh.episode["initial"] == {"secret": 7, "guesses": []}  # a copy, not shared


def test_lost_worker_samples_go_back_to_the_pool():
    buf = GroupBuffer(group_size=2, max_staleness=0, drop_all_equal=False)
    p = _prompt(0)
    samples = _samples(p, 2)
    buf.start_group(p, samples)
    buf.requeue_lost(samples)
    assert buf.partial_count == 2
    (again,) = buf.take_partials(trainer_version=0)
    assert len(again) == 2
    _balanced(buf)


def test_state_round_trip_keeps_every_sample_once_and_in_flight_becomes_partial():
    buf = GroupBuffer(group_size=2, max_staleness=1, drop_all_equal=False)
    p0, p1 = _prompt(0), _prompt(1)
    s0, s1 = _samples(p0, 2), _samples(p1, 2)
    buf.start_group(p0, s0)
    buf.start_group(p1, s1)
    buf.add([_finish(s0[0], 0, 1.0), _finish(s0[1], 0, 0.0), _abort(s1[0], 0)])
    before = buf.ledger()
    restored = GroupBuffer(group_size=2, max_staleness=1, drop_all_equal=False)
    restored.load_state_dict(pickle.loads(pickle.dumps(buf.state_dict())))
    assert restored.ledger() == before
    assert restored.partial_count == 2  # the aborted one and the one that was in flight
    assert restored.ready_groups == 1
    (resumed,) = restored.take_partials(trainer_version=1)
    assert sorted(s.sample_id for s in resumed) == ["p1/0", "p1/1"]
    restored.add([_finish(s, 1, 1.0) for s in resumed])
    # p1 has rewards (1, 1); no dynamic filter here, so it is ready.
    assert restored.pop_batch(2, trainer_version=1) is not None
    _balanced(restored)


def _stale_equal_good() -> tuple[GroupBuffer, tuple[Prompt, Prompt, Prompt]]:
    """Three complete groups at η = 0 with dynamic sampling: p0 generated at version 0 (stale
    at 1), p1 with equal rewards (dropped), p2 fresh and mixed (trainable)."""
    buf = GroupBuffer(group_size=2, max_staleness=0, drop_all_equal=True)
    stale, equal, good = (_prompt(i) for i in range(3))
    for p, rewards in [(stale, (1.0, 0.0)), (equal, (1.0, 1.0)), (good, (1.0, 0.0))]:
        samples = _samples(p, 2)
        buf.start_group(p, samples)
        version = 0 if p is stale else 1
        buf.add([_finish(s, version, r) for s, r in zip(samples, rewards, strict=True)])
    return buf, (stale, equal, good)


def test_every_sample_id_gets_exactly_one_fate_and_a_requeued_prompt_new_ids():
    buf, (stale, equal, good) = _stale_equal_good()
    assert buf.pop_batch(1, trainer_version=1)[0].prompt is good
    retry = buf.take_requeued()
    assert retry.prompt_id == "p0" and retry.attempt == 1
    assert buf.fates == {"p0/0": "dropped:stale", "p0/1": "dropped:stale",
                         "p1/0": "dropped:all_equal_reward", "p1/1": "dropped:all_equal_reward",
                         "p2/0": "trained@1", "p2/1": "trained@1"}
    _balanced(buf)
    buf.start_group(retry, _samples(retry, 2))  # the same ids again: a duplicate, counted
    assert buf.ledger()["duplicates"] == 2


def test_every_prompt_gets_one_fate_and_a_prompt_trained_twice_is_a_duplicate():
    buf, (stale, equal, good) = _stale_equal_good()
    buf.pop_batch(1, trainer_version=1)
    # p0 was dropped as stale but re-queued: still pending, not dropped.
    assert buf.prompt_fates() == {"p0": "pending", "p1": "dropped:all_equal_reward",
                                  "p2": "trained@1"}
    retry = buf.take_requeued()
    samples = [Sample(sample_id=f"p0/{k}~1", prompt_id="p0", prompt_ids=[1, 2],
                      max_new_tokens=4) for k in range(2)]
    buf.start_group(retry, samples)
    assert buf.prompt_fates()["p0"] == "pending"
    buf.add([_finish(s, 2, r) for s, r in zip(samples, (1.0, 0.0), strict=True)])
    buf.pop_batch(1, trainer_version=2)
    (row,) = [r for r in buf.ledger_entries() if r["prompt_id"] == "p0"]
    assert row == {"prompt_id": "p0", "fate": "trained@2",
                   "samples": {"p0/0": "dropped:stale", "p0/1": "dropped:stale",
                               "p0/0~1": "trained@2", "p0/1~1": "trained@2"}}
    assert buf.prompt_counts() == {"prompts_started": 3, "prompts_trained": 2,
                                   "prompts_pending": 0, "prompts_dropped": 1,
                                   "prompts_skipped": 0}
    _balanced(buf)
    # A bug that started a trained prompt again and trained it: counted, not hidden.
    again = _samples(good, 2)
    for s in again:
        s.sample_id += "~x"
    buf.start_group(good, again)
    buf.add([_finish(s, 2, r) for s, r in zip(again, (1.0, 0.0), strict=True)])
    buf.pop_batch(1, trainer_version=2)
    assert buf.ledger()["duplicates"] == 1


def test_only_prompts_dropped_for_good_are_reported_finished_once():
    buf, (stale, equal, good) = _stale_equal_good()
    buf.pop_batch(1, trainer_version=1)  # p0 stale (re-queued), p1 filtered, p2 trained
    assert buf.take_finished_prompts() == ["p1"]
    assert buf.take_finished_prompts() == []
    _balanced(buf)


def test_pools_give_a_requeued_prompt_fresh_sample_ids():
    from dataclasses import replace

    from asyncrl.controller.pools import new_samples

    first = [s.sample_id for s in new_samples(_prompt(0), 2, 4)]
    again = [s.sample_id for s in new_samples(replace(_prompt(0), attempt=1), 2, 4)]
    assert first == ["p0/0", "p0/1"] and again == ["p0/0~1", "p0/1~1"]
