"""The curriculum's pure rules: pass-rate statistics, the difficulty filter, variable n; and
GroupBuffer with groups of different sizes and skipped prompts (ledger balanced, checkpointed)."""

from __future__ import annotations

import pickle
import subprocess
import sys

from asyncrl.data.buffer import GroupBuffer
from asyncrl.data.curriculum import (
    TOO_EASY,
    TOO_HARD,
    Curriculum,
    FilterRule,
    Plan,
    PromptRecord,
    SampleRule,
    prompt_key,
)
from asyncrl.types import Prompt, Reward, RewardStatus
from tests.unit.test_buffer import _balanced, _finish, _samples

FILTER = FilterRule(low=0.2, high=0.8, min_samples=4, max_skips=2)


def _prompt(draw: int, text: str, attempt: int = 0) -> Prompt:
    return Prompt(prompt_id=f"train-{draw}", text=text, input_ids=[1, 2], answer="a",
                  attempt=attempt)


def test_the_pure_rules_import_neither_ray_nor_the_config():
    code = ("import sys, asyncrl.data.buffer; "
            "print([m for m in ('ray', 'asyncrl.config') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_prompt_key_is_stable_across_draws_and_tells_questions_apart():
    assert prompt_key(_prompt(0, "q")) == prompt_key(_prompt(7, "q"))  # same example, 2 epochs
    assert prompt_key(_prompt(0, "q")) != prompt_key(_prompt(0, "q2"))
    other_answer = Prompt(prompt_id="train-0", text="q", input_ids=[], answer="b")
    assert prompt_key(_prompt(0, "q")) != prompt_key(other_answer)


def test_recorded_groups_give_the_pass_rate_using_correct_where_the_reward_knows_it():
    c = Curriculum(default_n=4)
    c.record(_prompt(0, "q"), [Reward(0.3, correct=True), Reward(0.9, correct=False)], 1)
    c.record(_prompt(5, "q"), [Reward(1.0), Reward(0.0), Reward.failed("boom")], 3)
    record = c.stats[prompt_key(_prompt(0, "q"))]
    # failed rewards are not evidence: 4 answers, successes 1 + 0 + 1 + 0
    assert (record.samples, record.successes, record.groups, record.last_version) == (4, 2, 2, 3)
    assert record.pass_rate == 0.5
    c.record(_prompt(6, "q"), [Reward.failed("x", RewardStatus.TIMEOUT)], 4)  # nothing ok
    assert record.groups == 2


def test_the_filter_skips_outside_low_high_only_once_the_pass_rate_is_trusted():
    assert FILTER.skip_reason(None) is None  # never seen: generate it
    assert FILTER.skip_reason(PromptRecord(samples=3, successes=3)) is None  # < min_samples
    assert FILTER.skip_reason(PromptRecord(samples=4, successes=4)) == TOO_EASY  # 1.0 > 0.8
    assert FILTER.skip_reason(PromptRecord(samples=5, successes=0)) == TOO_HARD  # 0 < 0.2
    assert FILTER.skip_reason(PromptRecord(samples=5, successes=1)) is None  # 0.2: kept
    assert FILTER.skip_reason(PromptRecord(samples=5, successes=4)) is None  # 0.8: kept
    # skipped max_skips times in a row: generated again, so its pass rate follows the policy
    assert FILTER.skip_reason(PromptRecord(samples=4, successes=4, skips=2)) is None


def test_pass_rate_samples_give_hard_prompts_more_and_unknown_ones_the_default():
    rule = SampleRule(mode="pass_rate", n_min=2, n_max=10)
    assert rule.group_size(None, 0, default=4) == 4
    assert rule.group_size(PromptRecord(samples=4, successes=4), 0, default=4) == 2
    assert rule.group_size(PromptRecord(samples=4, successes=0), 0, default=4) == 10
    assert rule.group_size(PromptRecord(samples=4, successes=1), 0, default=4) == 8  # 2 + 6


def test_two_stage_samples_switch_at_the_given_policy_version():
    rule = SampleRule(mode="two_stage", stage2_version=5, stage2_n=64)
    assert [rule.group_size(None, v, default=8) for v in (0, 4, 5, 9)] == [8, 8, 64, 64]


def test_plan_counts_skips_in_a_row_and_never_skips_a_requeued_prompt():
    c = Curriculum(default_n=4, filter=FILTER, samples=SampleRule("pass_rate", 2, 6))
    easy = _prompt(0, "easy")
    c.record(easy, [Reward(1.0)] * 4, 0)
    assert c.plan(_prompt(1, "easy"), 1) == Plan(0, TOO_EASY)
    assert c.plan(_prompt(2, "easy", attempt=1), 1) == Plan(2)  # re-queued: admitted before
    assert c.plan(_prompt(3, "easy"), 1) == Plan(0, TOO_EASY)
    assert c.plan(_prompt(4, "easy"), 1) == Plan(2)  # 2 skips in a row: generated again
    c.record(_prompt(4, "easy"), [Reward(1.0)] * 2, 2)
    assert c.stats[prompt_key(easy)].skips == 0
    assert c.plan(_prompt(5, "fresh"), 2) == Plan(4)


def _run_group(buf: GroupBuffer, prompt: Prompt, n: int, rewards: list[float]) -> None:
    samples = _samples(prompt, n)
    buf.start_group(prompt, samples)
    buf.add([_finish(s, 0, r) for s, r in zip(samples, rewards, strict=True)])


def test_groups_of_different_sizes_train_whole_and_skipped_prompts_balance_the_ledger():
    curriculum = Curriculum(default_n=3, filter=FILTER, samples=SampleRule("pass_rate", 2, 6))
    buf = GroupBuffer(group_size=3, max_staleness=0, drop_all_equal=False,
                      curriculum=curriculum)
    first = [_prompt(0, "easy"), _prompt(1, "hard"), _prompt(2, "mid")]
    assert buf.plan(first, 0) == {"train-0": 3, "train-1": 3, "train-2": 3}  # all unknown
    for prompt, rewards in zip(first, [[1, 1, 1], [0, 0, 0], [1, 0, 1]], strict=True):
        _run_group(buf, prompt, 3, rewards)
    second = [_prompt(3, "easy"), _prompt(4, "hard"), _prompt(5, "mid")]
    sizes = buf.plan(second, 0)
    # 3 answers each < min_samples: none skipped, sized by pass rate (1 → 2, 0 → 6, ⅔ → 3)
    assert sizes == {"train-3": 2, "train-4": 6, "train-5": 3}
    for prompt, rewards in zip(second, [[1, 1], [0] * 6, [0, 1, 0]], strict=True):
        _run_group(buf, prompt, sizes[prompt.prompt_id], rewards)
    third = [_prompt(6, "easy"), _prompt(7, "hard"), _prompt(8, "mid")]
    sizes = buf.plan(third, 0)
    assert sizes == {"train-8": 4}  # mid: pass rate 0.5 → round(2 + 4 × 0.5)
    _run_group(buf, third[2], 4, [1, 0, 0, 1])
    batch = buf.pop_batch(7, trainer_version=0)
    assert sorted(len(g.samples) for g in batch) == [2, 3, 3, 3, 3, 4, 6]
    assert _balanced(buf)["trained"] == 24
    fates = buf.prompt_fates()
    assert fates["train-6"] == "skipped:too_easy" and fates["train-7"] == "skipped:too_hard"
    assert buf.prompt_counts() == {"prompts_started": 7, "prompts_trained": 7,
                                   "prompts_pending": 0, "prompts_dropped": 0,
                                   "prompts_skipped": 2}
    assert {r["prompt_id"]: r["samples"] for r in buf.ledger_entries()}["train-6"] == {}


def test_the_statistics_and_skips_survive_a_checkpoint():
    curriculum = Curriculum(default_n=2, filter=FILTER)
    buf = GroupBuffer(group_size=2, max_staleness=0, drop_all_equal=False,
                      curriculum=curriculum)
    for draw in range(2):
        _run_group(buf, _prompt(draw, "easy"), 2, [1.0, 1.0])
    assert buf.plan([_prompt(2, "easy")], 0) == {}
    state = pickle.loads(pickle.dumps(buf.state_dict()))  # as the checkpoint writes it
    restored = GroupBuffer(group_size=2, max_staleness=0, drop_all_equal=False,
                           curriculum=Curriculum(default_n=2, filter=FILTER))
    restored.load_state_dict(state)
    record = restored.curriculum.stats[prompt_key(_prompt(0, "easy"))]
    assert (record.samples, record.successes, record.groups, record.skips) == (4, 4, 2, 1)
    assert restored.prompt_fates()["train-2"] == "skipped:too_easy"
    assert restored.plan([_prompt(3, "easy")], 0) == {}  # still known too easy after resume
    assert restored.plan([_prompt(4, "easy")], 0) == {"train-4": 2}  # max_skips reached


def test_once_its_statistics_are_known_no_prompt_outside_the_band_is_emitted():
    """A stream of draws over 30 examples of known pass rates: every emitted prompt whose
    pass rate is trusted lies in [low, high], except the re-checks max_skips allows (none
    with a max_skips beyond the stream's length)."""
    import random

    rule = FilterRule(low=0.25, high=0.75, min_samples=4, max_skips=10**6)
    c = Curriculum(default_n=4, filter=rule)
    rates = {f"q{i}": i / 29 for i in range(30)}
    for text, rate in rates.items():  # each example seen once: 8 answers at its pass rate
        c.record(_prompt(-1, text), [Reward(float(k < round(8 * rate))) for k in range(8)], 0)
    rng, emitted, skipped = random.Random(0), [], 0
    for draw in range(2000):
        text = rng.choice(list(rates))
        plan = c.plan(_prompt(draw, text), 1)
        if plan.skip is None:
            emitted.append(c.stats[prompt_key(_prompt(draw, text))].pass_rate)
        else:
            skipped += 1
    assert emitted and skipped
    assert all(0.25 <= rate <= 0.75 for rate in emitted), sorted(set(emitted))
