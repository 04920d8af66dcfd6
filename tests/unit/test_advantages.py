"""Advantage estimators on hand-worked numbers, and the purity of the asyncrl.algo package."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from torch.testing import assert_close

from asyncrl.algo.advantages import (
    ADVANTAGE_ESTIMATORS,
    dr_grpo,
    expand_to_tokens,
    grpo,
    reinforce_pp_baseline,
    rloo,
)

# Two groups of four: [1, 0, 0, 1] and [1, 1, 1, 0]. The ids are not contiguous on purpose.
REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0])
GROUPS = torch.tensor([7, 7, 7, 7, 3, 3, 3, 3])


def test_grpo_centres_and_divides_by_the_unbiased_group_std():
    # Group 7: mean .5, centred ±.5, unbiased var = 4·.25 / 3 = 1/3, std = .57735 → ±.866025.
    # Group 3: mean .75, centred [.25, .25, .25, −.75], Σ sq = .75, var = .75 / 3 = .25,
    # std = .5 → [.5, .5, .5, −1.5].
    s = 0.5 / math.sqrt(1 / 3)  # 0.866025
    expected = torch.tensor([s, -s, -s, s, 0.5, 0.5, 0.5, -1.5])
    assert_close(grpo(REWARDS, GROUPS, eps=0.0), expected)
    # The default eps = 1e-6 moves the values by about 1e-6 relative.
    assert_close(grpo(REWARDS, GROUPS), expected, atol=1e-5, rtol=1e-5)


def test_grpo_handles_interleaved_ids_and_groups_of_different_sizes():
    # Groups 0: [2, 4], 9: [5] (alone), 4: [1, 2, 3], interleaved in the batch.
    rewards = torch.tensor([2.0, 1.0, 5.0, 4.0, 2.0, 3.0])
    groups = torch.tensor([0, 4, 9, 0, 4, 4])
    # Group 0: mean 3, centred [−1, 1], var = 2 / 1, std = √2 → ∓.707107.
    # Group 9: one sample → 0. Group 4: mean 2, centred [−1, 0, 1], var = 2 / 2 = 1 → [−1, 0, 1].
    h = 1 / math.sqrt(2)
    expected = torch.tensor([-h, -1.0, 0.0, h, 0.0, 1.0])
    assert_close(grpo(rewards, groups, eps=0.0), expected)


def test_grpo_gives_zero_not_nan_for_a_group_with_equal_rewards_even_without_eps():
    # Scenario: every sample of a prompt got the same reward, std 0, eps 0 → 0/0 avoided.
    rewards, groups = torch.tensor([0.3, 0.3, 0.3, 1.0, 0.0]), torch.tensor([1, 1, 1, 2, 2])
    out = grpo(rewards, groups, eps=0.0)
    h = 0.5 / math.sqrt(0.5)  # group 2: centred ±.5, var = .5 / 1
    assert_close(out, torch.tensor([0.0, 0.0, 0.0, h, -h]))


def test_dr_grpo_only_centres_and_equals_grpo_without_std():
    # Group 7: mean .5 → ±.5; group 3: mean .75 → [.25, .25, .25, −.75].
    expected = torch.tensor([0.5, -0.5, -0.5, 0.5, 0.25, 0.25, 0.25, -0.75])
    assert_close(dr_grpo(REWARDS, GROUPS), expected)
    assert_close(grpo(REWARDS, GROUPS, normalize_std=False), expected)


def test_rloo_subtracts_the_mean_of_the_other_samples():
    # Group 7: 1 − mean(0, 0, 1) = 2/3; 0 − mean(1, 0, 1) = −2/3.
    # Group 3: 1 − mean(1, 1, 0) = 1/3; 0 − mean(1, 1, 1) = −1.
    expected = torch.tensor([2, -2, -2, 2, 1, 1, 1, -3]) / 3
    assert_close(rloo(REWARDS, GROUPS), expected)


def test_rloo_gives_zero_to_a_group_of_one_and_a_pair_their_difference():
    # Pair [2, 4]: 2 − 4 = −2 and 4 − 2 = 2. Alone [5]: no others → 0.
    rewards, groups = torch.tensor([2.0, 5.0, 4.0]), torch.tensor([0, 1, 0])
    assert_close(rloo(rewards, groups), torch.tensor([-2.0, 0.0, 2.0]))


def test_reinforce_pp_normalises_group_centred_rewards_by_the_batch_std():
    # Centred: [.5, −.5, −.5, .5, .25, .25, .25, −.75], batch mean 0.
    # Σ sq = 4·.25 + 3·.0625 + .5625 = 1.75; unbiased var = 1.75 / 7 = .25; std = .5.
    # → centred / .5. (GRPO divides group 7 by its own std .577 instead, giving ±.866.)
    expected = torch.tensor([1.0, -1.0, -1.0, 1.0, 0.5, 0.5, 0.5, -1.5])
    assert_close(reinforce_pp_baseline(REWARDS, GROUPS, eps=0.0), expected)


def test_reinforce_pp_uses_one_std_for_the_whole_batch_unlike_grpo():
    # Groups [0, 1] and [0, 10]: GRPO gives both ±.707; REINFORCE++ keeps the 10× scale.
    # Centred: [−.5, .5, −5, 5]; Σ sq = 50.5; var = 50.5 / 3; std = 4.10284.
    rewards, groups = torch.tensor([0.0, 1.0, 0.0, 10.0]), torch.tensor([0, 0, 1, 1])
    std = math.sqrt(50.5 / 3)
    expected = torch.tensor([-0.5, 0.5, -5.0, 5.0]) / std
    assert_close(reinforce_pp_baseline(rewards, groups, eps=0.0), expected)
    assert_close(grpo(rewards, groups, eps=0.0)[:2], grpo(rewards, groups, eps=0.0)[2:])


def test_reinforce_pp_gives_zero_for_one_sample_or_all_equal_rewards():
    assert_close(reinforce_pp_baseline(torch.tensor([3.0]), torch.tensor([0])), torch.zeros(1))
    out = reinforce_pp_baseline(torch.ones(4), torch.tensor([0, 0, 1, 1]), eps=0.0)
    assert_close(out, torch.zeros(4))


def test_estimators_return_an_empty_tensor_for_an_empty_batch():
    empty_r, empty_g = torch.zeros(0), torch.zeros(0, dtype=torch.long)
    for estimator in ADVANTAGE_ESTIMATORS.values():
        assert estimator(empty_r, empty_g).shape == (0,)


def test_estimators_reject_rewards_and_group_ids_of_different_shapes():
    with pytest.raises(ValueError, match="must both be \\[B\\]"):
        grpo(torch.zeros(3), torch.zeros(2, dtype=torch.long))


def test_registry_names_the_four_estimators():
    assert ADVANTAGE_ESTIMATORS == {
        "grpo": grpo, "dr_grpo": dr_grpo, "rloo": rloo, "reinforce_pp": reinforce_pp_baseline,
    }


def test_expand_to_tokens_repeats_over_trained_tokens_and_is_zero_elsewhere():
    # Row 1 has no trained token and a NaN advantage: still exactly 0 everywhere.
    mask = torch.tensor([[False, True, True], [False, False, False], [False, False, True]])
    out = expand_to_tokens(torch.tensor([2.0, float("nan"), -1.0]), mask)
    assert_close(out, torch.tensor([[0.0, 2.0, 2.0], [0.0, 0.0, 0.0], [0.0, 0.0, -1.0]]))


def test_algo_package_imports_only_torch_and_the_standard_library():
    # Scenario: a fresh interpreter imports every algo module; nothing beyond torch, the
    # standard library and asyncrl.algo itself may appear (in particular no ray, no config).
    code = (
        "import sys, json, torch\n"
        "before = set(sys.modules)\n"
        "import asyncrl.algo, asyncrl.algo.advantages, asyncrl.algo.losses, asyncrl.algo.kl\n"
        "import asyncrl.algo.aggregate, asyncrl.algo.staleness\n"
        "print(json.dumps(sorted(set(sys.modules) - before)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    new = json.loads(out.stdout)
    assert not [m for m in new if m == "ray" or m.startswith(("ray.", "asyncrl.config"))]
    foreign = [m for m in new if m.split(".")[0] not in sys.stdlib_module_names
               and m != "asyncrl" and not m.startswith("asyncrl.algo")]
    assert foreign == []
