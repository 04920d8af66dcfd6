"""The curriculum on a real local Ray cluster: prompts recorded too easy or too hard are skipped
before generation, the rest get a number of samples by pass rate, the ledger balances, and the
statistics survive a checkpoint."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from asyncrl.controller.checkpoint import read_state
from asyncrl.data.tasks import SortDigits
from tests.integration.test_pipeline import _config, _start, _train

pytestmark = pytest.mark.timeout(300)


def _train_file(path) -> str:
    """Six prompts, two of each level (the reward tests.plugins.rewards:by_level reads it)."""
    task, rng = SortDigits(), random.Random(0)
    levels = ["easy", "hard", "mid"] * 2
    path.write_text("".join(json.dumps({"prompt": e.prompt, "answer": e.answer, "level": lv})
                            + "\n" for e, lv in ((task.example(rng), lv) for lv in levels)))
    return str(path)


async def test_the_curriculum_skips_easy_and_hard_prompts_and_varies_group_sizes(
    ray_local, tmp_path
):
    overrides = [
        f"data.train_file={_train_file(tmp_path / 'train.jsonl')}",
        "reward.fn=tests.plugins.rewards:by_level", "model.warm_start.steps=0",
        "rollout.n_samples=3", "rollout.num_workers=1",
        "data.curriculum.enabled=true", "data.curriculum.low=0.1", "data.curriculum.high=0.9",
        "data.curriculum.min_samples=3", "data.curriculum.max_skips=2",
        "rollout.adaptive_samples.mode=pass_rate", "rollout.adaptive_samples.n_min=2",
        "rollout.adaptive_samples.n_max=6",
    ]
    first = await _start(_config(tmp_path, "curriculum", *overrides))
    try:
        trained = await _train(first, 4)
        await first.stop_producer()
        checkpoint = await first.pools.checkpoint(tmp_path / "ckpt")
        saved = read_state(checkpoint)["data"]["curriculum"]
        ledger = await first.settle()
        rows = await first.pools.data.ledger_entries()
    finally:
        first.pools.close()
    # every drawn prompt is started or skipped; skipped ones start no sample
    assert ledger["balance"] == 0 and ledger["duplicates"] == 0, ledger
    assert len(rows) == ledger["prompts_started"] + ledger["prompts_skipped"]
    fates = Counter(r["fate"].partition("@")[0] for r in rows)
    assert all(not r["samples"] for r in rows if r["fate"].startswith("skipped:"))
    assert fates["skipped:too_easy"] > 0 and fates["skipped:too_hard"] > 0, fates
    assert ledger["prompts_skipped"] == fates["skipped:too_easy"] + fates["skipped:too_hard"]
    sizes = Counter(s.prompt_id for s, _ in trained).values()
    assert len(set(sizes)) > 1 and min(sizes) >= 2 and max(sizes) <= 6, sizes
    # 6 distinct examples however many times each was drawn; easy ones always pass
    assert len(saved) == 6 and sorted(s[1] / s[0] for s in saved.values())[-1] == 1.0

    resumed = await _start(_config(tmp_path, "curriculum-resumed", *overrides))
    try:
        await resumed.pools.restore(checkpoint)
        assert (await resumed.pools.data.state_dict())["curriculum"] == saved
        await _train(resumed, 1)
        after = await resumed.settle()
    finally:
        resumed.pools.close()
    assert after["balance"] == 0 and after["prompts_skipped"] >= ledger["prompts_skipped"]
