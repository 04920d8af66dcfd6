"""The maths, on hand-worked numbers."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from torch.testing import assert_close

from asyncrl.algo.advantages import (
    dr_grpo,
    expand_to_tokens,
    grpo,
    reinforce_pp_baseline,
    rloo,
)
from asyncrl.algo.aggregate import aggregate
from asyncrl.algo.kl import kl_estimate
from asyncrl.algo.losses import behaviour_weights, cispo, dual_clip_ppo, gspo, ppo_clip
from asyncrl.algo.staleness import is_trainable, staleness

# Two groups of four: [1, 0, 0, 1] (mean .5, unbiased std √(1/3)) and [1, 1, 1, 0]
# (mean .75, unbiased std .5). Group ids are not contiguous on purpose.
REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0])
GROUPS = torch.tensor([7, 7, 7, 7, 3, 3, 3, 3])


def test_grpo_normalises_within_each_group():
    s = math.sqrt(3) / 2  # 0.5 / √(1/3)
    expected = torch.tensor([s, -s, -s, s, 0.5, 0.5, 0.5, -1.5])
    assert_close(grpo(REWARDS, GROUPS, eps=0.0), expected)


def test_dr_grpo_only_centres():
    expected = torch.tensor([0.5, -0.5, -0.5, 0.5, 0.25, 0.25, 0.25, -0.75])
    assert_close(dr_grpo(REWARDS, GROUPS), expected)
    assert_close(grpo(REWARDS, GROUPS, normalize_std=False), expected)


def test_rloo_subtracts_the_mean_of_the_others():
    # 1 − mean(0, 0, 1) = 2/3; 0 − mean(1, 0, 1) = −2/3; 1 − mean(1, 1, 0) = 1/3; 0 − 1 = −1.
    expected = torch.tensor([2, -2, -2, 2, 1, 1, 1, -3]) / 3
    assert_close(rloo(REWARDS, GROUPS), expected)


def test_single_sample_groups_get_zero_advantage():
    rewards, groups = torch.tensor([0.3, 0.9]), torch.tensor([0, 1])
    assert_close(grpo(rewards, groups), torch.zeros(2))
    assert_close(rloo(rewards, groups), torch.zeros(2))


def test_reinforce_pp_normalises_over_the_batch():
    centred = dr_grpo(REWARDS, GROUPS)
    expected = (centred - centred.mean()) / centred.std()
    assert_close(reinforce_pp_baseline(REWARDS, GROUPS, eps=0.0), expected)


def test_expand_to_tokens_masks():
    mask = torch.tensor([[False, True, True], [False, False, True]])
    assert_close(expand_to_tokens(torch.tensor([2.0, -1.0]), mask),
                 torch.tensor([[0.0, 2.0, 2.0], [0.0, 0.0, -1.0]]))


def _ppo_inputs():
    # ratios 1.5, 0.5, 1.0 against old logprobs 0; advantages 1, −1, 2; one masked position.
    logprobs = torch.log(torch.tensor([[1.5, 0.5, 1.0, 1.0]])).requires_grad_()
    old = torch.zeros(1, 4)
    adv = torch.tensor([[1.0, -1.0, 2.0, 5.0]])
    mask = torch.tensor([[True, True, True, False]])
    return logprobs, old, adv, mask


def test_ppo_clip_hand_worked_values_and_clipped_tokens_have_no_gradient():
    logprobs, old, adv, mask = _ppo_inputs()
    loss, metrics = ppo_clip(logprobs, old, adv, mask, clip_low=0.2, clip_high=0.2)
    # token 0: min(1.5, 1.2)·1 = 1.2 → −1.2 (clipped); token 1: min(−.5, −.8) = −.8 → .8
    # (clipped); token 2: 2 → −2; token 3 masked → 0.
    assert_close(loss, torch.tensor([[-1.2, 0.8, -2.0, 0.0]]))
    assert_close(aggregate(loss, mask, "token-mean"), torch.tensor(-0.8))
    assert_close(metrics["clip_fraction"], torch.tensor(2 / 3))
    aggregate(loss, mask, "token-mean").backward()
    # d/dlogp of −ρA = −ρA; only token 2 is unclipped: −1·2/3 (token-mean over 3 tokens).
    assert_close(logprobs.grad, torch.tensor([[0.0, 0.0, -2 / 3, 0.0]]))


def test_clip_higher_lets_positive_advantages_grow_further():
    logprobs, old, adv, mask = _ppo_inputs()
    loss, _ = ppo_clip(logprobs, old, adv, mask, clip_low=0.2, clip_high=0.28)
    assert_close(loss[0, 0], torch.tensor(-1.28))


def test_dual_clip_bounds_the_loss_of_negative_advantages():
    logprobs = torch.log(torch.tensor([[5.0, 5.0]]))
    adv = torch.tensor([[-1.0, 1.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, _ = dual_clip_ppo(logprobs, torch.zeros(1, 2), adv, mask, clip_c=3.0)
    # A < 0: PPO gives −min(−5, −1.2) = 5, bounded by −c·A = 3. A > 0: −min(5, 1.2) = −1.2.
    assert_close(loss, torch.tensor([[3.0, -1.2]]))
    with pytest.raises(ValueError, match="clip_c > 1"):
        dual_clip_ppo(logprobs, torch.zeros(1, 2), adv, mask, clip_c=1.0)


def test_gspo_uses_one_sequence_ratio_for_every_token():
    # log-ratios 0.2 and 0.0 → sequence ratio exp(0.1); with a wide clip nothing is clipped.
    logprobs = torch.tensor([[0.2, 0.0, 9.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False]])
    loss, _ = gspo(logprobs, torch.zeros(1, 3), torch.ones(1, 3), mask, clip_low=1, clip_high=1)
    s = math.exp(0.1)
    assert_close(loss, torch.tensor([[-s, -s, 0.0]]))
    aggregate(loss, mask, "seq-mean-token-mean").backward()
    # d/dlogp_t of −s (s = exp(mean_t log-ratio)) is −s/2 per token; GSPO-token: −s·(1/2).
    assert_close(logprobs.grad, torch.tensor([[-s / 2, -s / 2, 0.0]]))


def test_cispo_clips_the_weight_but_keeps_every_gradient():
    logprobs = torch.log(torch.tensor([[2.0, 1.0]])).requires_grad_()
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, _ = cispo(logprobs, torch.zeros(1, 2), torch.ones(1, 2), mask, clip_high=0.2)
    aggregate(loss, mask, "token-mean").backward()
    # weights sg(min(ρ, 1.2)) = 1.2 and 1.0; gradient −w·A / 2 on both tokens, none zeroed.
    assert_close(logprobs.grad, torch.tensor([[-0.6, -0.5]]))


def test_behaviour_weights_are_truncated_importance_ratios():
    old = torch.log(torch.tensor([[0.5, 0.9, 0.2]]))
    rollout = torch.log(torch.tensor([[0.25, 0.9, 0.8]]))
    mask = torch.tensor([[True, True, False]])
    w = behaviour_weights(old, rollout, mask, mode="decoupled", cap=1.5)
    assert_close(w, torch.tensor([[1.5, 1.0, 0.0]]))  # ratio 2 capped at 1.5
    assert_close(behaviour_weights(old, rollout, mask, mode="none"),
                 torch.tensor([[1.0, 1.0, 0.0]]))
    with pytest.raises(ValueError, match="unknown off-policy correction"):
        behaviour_weights(old, rollout, mask, mode="magic")


def test_kl_estimators_hand_worked():
    logp, ref = torch.tensor([[math.log(0.5)]]), torch.tensor([[math.log(0.25)]])
    d = math.log(2)  # logp − ref
    assert_close(kl_estimate(logp, ref, "k1"), torch.tensor([[d]]))
    assert_close(kl_estimate(logp, ref, "k2"), torch.tensor([[0.5 * d * d]]))
    assert_close(kl_estimate(logp, ref, "k3"), torch.tensor([[0.5 + d - 1]]))


def test_aggregation_modes_hand_worked():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, float("nan"), float("inf")]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    assert_close(aggregate(values, mask, "token-mean"), torch.tensor(10 / 4))
    assert_close(aggregate(values, mask, "seq-mean-token-sum"), torch.tensor((6 + 4) / 2))
    assert_close(aggregate(values, mask, "seq-mean-token-mean"), torch.tensor((2 + 4) / 2))
    assert_close(aggregate(values, mask, "seq-mean-token-sum-norm", norm_tokens=5),
                 torch.tensor((6 + 4) / (2 * 5)))
    empty = torch.zeros_like(mask)
    assert aggregate(values, empty, "token-mean") == 0
    with pytest.raises(ValueError, match="unknown aggregation mode"):
        aggregate(values, mask, "mean")


def test_staleness_is_trainer_version_minus_oldest_token():
    assert staleness([3, 4, 5], trainer_version=6) == 3
    assert staleness([], trainer_version=6) == 0
    assert is_trainable([5, 6], 6, max_staleness=1)
    assert not is_trainable([4, 6], 6, max_staleness=1)


def test_algo_imports_neither_ray_nor_config():
    code = ("import sys, asyncrl.algo.advantages, asyncrl.algo.losses, asyncrl.algo.kl, "
            "asyncrl.algo.aggregate, asyncrl.algo.staleness; "
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('asyncrl.config')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_learning_rate_schedules_hand_worked():
    from asyncrl.train.torch_backend import lr_factor

    linear = lr_factor("linear", total_steps=100, warmup_steps=0, min_ratio=0.1)
    assert [linear(0), linear(50), linear(100), linear(200)] == pytest.approx([1, 0.55, 0.1, 0.1])
    cosine = lr_factor("cosine", total_steps=110, warmup_steps=10, min_ratio=0.0)
    assert [cosine(0), cosine(9), cosine(10), cosine(60), cosine(110)] == pytest.approx(
        [0.1, 1.0, 1.0, 0.5, 0.0], abs=1e-9)
    assert lr_factor("constant", total_steps=5, warmup_steps=0, min_ratio=0.1)(4) == 1.0
