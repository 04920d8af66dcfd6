"""Policy losses and behaviour weights on hand-worked numbers, gradients included."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from asyncrl.algo.aggregate import MODES, aggregate
from asyncrl.algo.losses import (
    POLICY_LOSSES,
    behaviour_weights,
    cispo,
    dapo,
    dual_clip_ppo,
    gspo,
    ppo_clip,
)

INF, NAN = float("inf"), float("nan")


def _leaf(values: list[list[float]], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, requires_grad=True)


def _log_leaf(probs: list[list[float]]) -> torch.Tensor:
    return torch.log(torch.tensor(probs)).requires_grad_()


def _ppo_inputs():
    # Ratios 1.5, 0.5, 1.0 against old logprobs 0; advantages 1, −1, 2; the last is masked.
    logprobs = _log_leaf([[1.5, 0.5, 1.0, 1.0]])
    old = torch.zeros(1, 4)
    adv = torch.tensor([[1.0, -1.0, 2.0, 5.0]])
    mask = torch.tensor([[True, True, True, False]])
    return logprobs, old, adv, mask


def test_ppo_clip_hand_worked_values_metrics_and_zero_gradient_on_clipped_tokens():
    logprobs, old, adv, mask = _ppo_inputs()
    loss, metrics = ppo_clip(logprobs, old, adv, mask, clip_low=0.2, clip_high=0.2)
    # token 0: −min(1.5·1, 1.2·1) = −1.2 (clipped); token 1: −min(−.5, −.8) = .8 (clipped);
    # token 2: −min(2, 2) = −2; token 3 masked → 0.
    assert_close(loss, torch.tensor([[-1.2, 0.8, -2.0, 0.0]]))
    assert_close(metrics["clip_fraction"], torch.tensor(2 / 3))
    # approx_kl = mean(old − new) = −(ln 1.5 + ln .5 + 0) / 3 = .0958940.
    assert_close(metrics["approx_kl"], torch.tensor(-(math.log(1.5) + math.log(0.5)) / 3))
    assert_close(metrics["ratio_mean"], torch.tensor(1.0))  # (1.5 + .5 + 1) / 3
    total = aggregate(loss, mask, "token-mean")
    assert_close(total, torch.tensor(-0.8))  # (−1.2 + .8 − 2) / 3
    total.backward()
    # d(−ρA)/dlogp = −ρA; only token 2 is unclipped: −1·2 / 3.
    assert_close(logprobs.grad, torch.tensor([[0.0, 0.0, -2 / 3, 0.0]]))


def test_ppo_clip_keeps_the_gradient_where_clipping_would_be_optimistic():
    # ρ = 1.5 with A = −1: min(−1.5, −1.2) = −1.5 is the unclipped term → loss 1.5, grad −ρA = 1.5.
    # ρ = .5 with A = 1: min(.5, .8) = .5 unclipped → loss −.5, grad −.5.
    logprobs, mask = _log_leaf([[1.5, 0.5]]), torch.ones(1, 2, dtype=torch.bool)
    loss, metrics = ppo_clip(logprobs, torch.zeros(1, 2), torch.tensor([[-1.0, 1.0]]), mask)
    assert_close(loss, torch.tensor([[1.5, -0.5]]))
    assert metrics["clip_fraction"] == 0
    aggregate(loss, mask, "seq-mean-token-sum").backward()
    assert_close(logprobs.grad, torch.tensor([[1.5, -0.5]]))


def test_dapo_is_ppo_clip_with_a_higher_upper_clip():
    # Token 0 (ρ 1.5, A 1) is clipped at 1 + .28 instead of 1 + .2.
    logprobs, old, adv, mask = _ppo_inputs()
    assert_close(dapo(logprobs, old, adv, mask)[0][0, 0], torch.tensor(-1.28))
    higher, _ = ppo_clip(logprobs, old, adv, mask, clip_low=0.2, clip_high=0.28)
    assert_close(higher[0, 0], torch.tensor(-1.28))
    assert higher[0, 1].item() == pytest.approx(0.8)  # the lower side keeps ε_low = .2


def test_dual_clip_bounds_the_loss_of_negative_advantages_and_zeroes_their_gradient():
    # Old logprobs 0, ratios 5, 2, 5; advantages −1, −1, +1; c = 3.
    logprobs, mask = _log_leaf([[5.0, 2.0, 5.0]]), torch.ones(1, 3, dtype=torch.bool)
    adv = torch.tensor([[-1.0, -1.0, 1.0]])
    loss, metrics = dual_clip_ppo(logprobs, torch.zeros(1, 3), adv, mask, clip_c=3.0)
    # token 0: PPO −min(−5, −1.2) = 5, bounded by −cA = 3 → 3, gradient 0.
    # token 1: PPO −min(−2, −1.2) = 2 < 3 → 2, gradient −ρA = 2.
    # token 2: A > 0, PPO clip → −1.2, gradient 0.
    assert_close(loss, torch.tensor([[3.0, 2.0, -1.2]]))
    assert_close(metrics["dual_clip_fraction"], torch.tensor(1 / 3))
    assert_close(metrics["clip_fraction"], torch.tensor(1 / 3))
    aggregate(loss, mask, "seq-mean-token-sum").backward()
    assert_close(logprobs.grad, torch.tensor([[0.0, 2.0, 0.0]]))
    plain, _ = ppo_clip(logprobs, torch.zeros(1, 3), adv, mask)
    assert plain[0, 0].item() == pytest.approx(5.0)  # unbounded without the dual clip


def test_dual_clip_rejects_a_bound_of_one_or_less():
    logprobs, old, adv, mask = _ppo_inputs()
    with pytest.raises(ValueError, match="clip_c > 1"):
        dual_clip_ppo(logprobs, old, adv, mask, clip_c=1.0)


def test_gspo_puts_the_sequence_value_on_every_token():
    # Log-ratios .2 and 0 → s = exp(.1) = 1.105171; a wide clip leaves it alone; A = 1.
    logprobs = _leaf([[0.2, 0.0, -INF]])
    mask = torch.tensor([[True, True, False]])
    loss, _ = gspo(logprobs, torch.zeros(1, 3), torch.ones(1, 3), mask, clip_low=1, clip_high=1)
    s = math.exp(0.1)
    assert_close(loss, torch.tensor([[-s, -s, 0.0]]))
    aggregate(loss, mask, "seq-mean-token-mean").backward()
    # d(−s)/dlogp_t = −s · (1/2): s = exp(mean of 2 log-ratios).
    assert_close(logprobs.grad, torch.tensor([[-s / 2, -s / 2, 0.0]]))


def test_gspo_clips_whole_sequences_with_the_paper_ranges():
    # Old logprobs −1. Sequence 0: log-ratios [.2, 0] → s0 = e^.1 = 1.105171, A = 1: above
    # 1 + 4e-4 → clipped: loss −1.0004 on both tokens, gradient 0.
    # Sequence 1: log-ratios [3e-4, −1e-4, 1e-4] → s1 = e^1e-4 = 1.0001, inside
    # [1 − 3e-4, 1 + 4e-4], A = 2 → loss −2.0002; gradient (B = 2, n = 3): −(1/2)(1/3)·2·s1.
    delta = torch.tensor([[0.2, 0.0, 0.0], [3e-4, -1e-4, 1e-4]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    old = torch.full((2, 3), -1.0)
    logprobs = (old + delta).requires_grad_()
    adv = torch.tensor([[1.0, 1.0, 0.0], [2.0, 2.0, 2.0]])
    loss, metrics = gspo(logprobs, old, adv, mask)
    s1 = math.exp(1e-4)
    assert_close(loss, torch.tensor([[-1.0004, -1.0004, 0.0], [-2 * s1] * 3]))
    assert_close(metrics["clip_fraction"], torch.tensor(2 / 5))
    assert_close(metrics["ratio_mean"], torch.tensor((math.exp(0.1) + s1) / 2))
    aggregate(loss, mask, "seq-mean-token-mean").backward()
    g = -s1 / 3
    assert_close(logprobs.grad, torch.tensor([[0.0, 0.0, 0.0], [g, g, g]]))


def _gspo_sequence_objective(logprobs, old, adv, mask, eps):
    # GSPO as the paper writes it, per sequence, with s_b differentiated directly.
    n = mask.sum(-1)
    s = torch.exp(((logprobs - old) * mask).sum(-1) / n)
    a = (adv * mask).sum(-1) / n
    return (-torch.minimum(s * a, s.clamp(1 - eps, 1 + eps) * a)).mean()


def test_gspo_token_gradient_matches_a_finite_difference_of_the_sequence_objective():
    # Three sequences, ε = .1. Seq 0: mean log-ratio .2 (s 1.221), A = 1 → clipped, flat.
    # Seq 1: mean .02 (s 1.020), A = −.5 → inside the range. Seq 2: mean .3 (s 1.350), A = −1 →
    # unclipped (the pessimistic branch), gradient flows.
    f64 = torch.float64
    old = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, -0.7], [-2.0, -0.1, 0.0]], dtype=f64)
    delta = torch.tensor([[0.3, 0.1, 0.0], [0.05, -0.01, 0.02], [0.4, 0.2, 0.0]], dtype=f64)
    mask = torch.tensor([[True, True, False], [True, True, True], [True, True, False]])
    adv = torch.tensor([[1.0] * 3, [-0.5] * 3, [-1.0] * 3], dtype=f64) * mask
    logprobs = (old + delta).requires_grad_()
    loss, _ = gspo(logprobs, old, adv, mask, clip_low=0.1, clip_high=0.1)
    total = aggregate(loss, mask, "seq-mean-token-mean")
    expected = _gspo_sequence_objective(old + delta, old, adv, mask, 0.1)
    assert_close(total, expected)
    total.backward()
    h, numeric = 1e-6, torch.zeros_like(old)
    for b, t in mask.nonzero().tolist():
        bump = torch.zeros_like(old)
        bump[b, t] = h
        up = _gspo_sequence_objective(old + delta + bump, old, adv, mask, 0.1)
        down = _gspo_sequence_objective(old + delta - bump, old, adv, mask, 0.1)
        numeric[b, t] = (up - down) / (2 * h)
    assert_close(logprobs.grad, numeric, atol=1e-8, rtol=1e-6)
    assert (logprobs.grad[0] == 0).all() and (logprobs.grad[1:, :2] != 0).all()


def test_cispo_clips_the_weight_but_never_zeroes_a_gradient():
    # Ratios 2 and 1, A = 1, ε_high = .2: weights sg(min(ρ, 1.2)) = 1.2 and 1.
    logprobs, mask = _log_leaf([[2.0, 1.0]]), torch.ones(1, 2, dtype=torch.bool)
    loss, metrics = cispo(logprobs, torch.zeros(1, 2), torch.ones(1, 2), mask, clip_high=0.2)
    assert_close(loss, torch.tensor([[-1.2 * math.log(2.0), 0.0]]))  # −w·A·logp
    assert_close(metrics["clip_fraction"], torch.tensor(0.5))
    assert_close(metrics["ratio_mean"], torch.tensor(1.5))
    aggregate(loss, mask, "token-mean").backward()
    # Gradient −w·A / 2 on both tokens; PPO-clip would give token 0 none.
    assert_close(logprobs.grad, torch.tensor([[-0.6, -0.5]]))


def test_cispo_lower_clip_applies_only_when_asked():
    # Ratio .5, A = 1: no lower bound → weight .5; ε_low = .2 → weight .8. Gradient −w·A.
    mask = torch.ones(1, 1, dtype=torch.bool)
    for clip_low, weight in ((None, 0.5), (0.2, 0.8)):
        logprobs = _log_leaf([[0.5]])
        loss, _ = cispo(logprobs, torch.zeros(1, 1), torch.ones(1, 1), mask, clip_low=clip_low)
        aggregate(loss, mask, "seq-mean-token-sum").backward()
        assert_close(logprobs.grad, torch.tensor([[-weight]]))


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
def test_every_loss_on_policy_is_minus_advantage_times_the_logprob_gradient(name):
    # Scenario: first step after a rollout, logprobs == old_logprobs, so every ratio is 1. Each
    # loss then reduces to the plain policy gradient: ∂loss/∂logp = −A per token.
    # A = [1, −2, .5] on trained tokens; token-mean over 3 tokens → [−1/3, 2/3, −1/6, 0].
    probs = torch.tensor([[0.3, 0.6, 0.9, 0.5]])
    logprobs, old = torch.log(probs).requires_grad_(), torch.log(probs)
    adv = torch.tensor([[1.0, -2.0, 0.5, 7.0]])
    mask = torch.tensor([[True, True, True, False]])
    loss, _ = POLICY_LOSSES[name](logprobs, old, adv, mask)
    if name != "cispo":  # CISPO's value is −A·logp, a surrogate; the others' value is −ρA = −A
        assert_close(loss, torch.tensor([[-1.0, 2.0, -0.5, 0.0]]))
    aggregate(loss, mask, "token-mean").backward()
    assert_close(logprobs.grad, torch.tensor([[-1 / 3, 2 / 3, -1 / 6, 0.0]]))


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
def test_every_loss_is_exactly_zero_and_gradient_free_on_garbage_masked_positions(name):
    # Masked positions hold −inf / NaN / huge values; trained tokens include an extreme
    # log-ratio of ±100 (clamped). Nothing may be NaN, masked outputs and gradients are 0.
    logprobs = _leaf([[-0.5, 50.0, -INF, NAN], [-50.0, -1.0, 1e30, -INF]])
    old = torch.tensor([[-0.7, -50.0, -INF, 0.0], [50.0, NAN, -INF, NAN]])
    adv = torch.tensor([[1.0, -1.0, NAN, INF], [-1.0, NAN, 1e30, 1.0]])
    mask = torch.tensor([[True, True, False, False], [True, False, False, False]])
    loss, metrics = POLICY_LOSSES[name](logprobs, old, adv, mask)
    assert torch.isfinite(loss).all()
    assert (loss[~mask] == 0).all()
    assert all(torch.isfinite(v).all() for v in metrics.values())
    for mode in MODES:
        total = aggregate(loss, mask, mode, norm_tokens=4)
        assert torch.isfinite(total)
        (grad,) = torch.autograd.grad(total, logprobs, retain_graph=True)
        assert torch.isfinite(grad).all() and (grad[~mask] == 0).all()


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
def test_every_loss_gives_zeros_for_an_all_masked_batch(name):
    logprobs = _leaf([[-1.0, -INF], [NAN, 3.0]])
    mask = torch.zeros(2, 2, dtype=torch.bool)
    loss, metrics = POLICY_LOSSES[name](logprobs, torch.zeros(2, 2), torch.ones(2, 2), mask)
    assert (loss == 0).all()
    assert all(v == 0 for k, v in metrics.items() if k != "ratio_mean")
    aggregate(loss, mask, "seq-mean-token-mean").backward()
    assert (logprobs.grad == 0).all()


def test_losses_reject_inputs_of_different_shapes_and_negative_clips():
    logprobs, old, adv, mask = _ppo_inputs()
    with pytest.raises(ValueError, match="must all be \\[B, T\\]"):
        ppo_clip(logprobs, old[:, :3], adv, mask)
    with pytest.raises(ValueError, match="clip ranges must be >= 0"):
        gspo(logprobs, old, adv, mask, clip_low=-0.1)


def test_registry_names_the_five_losses():
    assert POLICY_LOSSES == {"ppo_clip": ppo_clip, "dual_clip": dual_clip_ppo, "dapo": dapo,
                             "gspo": gspo, "cispo": cispo}


def _behaviour_inputs():
    # π_old / π_behaviour = .5/.25 = 2, .9/.9 = 1, .2/.8 = .25; the last token is masked (−inf).
    old = torch.log(torch.tensor([[0.5, 0.9, 0.2, 0.1]])).requires_grad_()
    rollout = torch.log(torch.tensor([[0.25, 0.9, 0.8, 0.0]]))
    mask = torch.tensor([[True, True, True, False]])
    return old, rollout, mask


def test_behaviour_weights_truncate_decoupled_and_tis_identically():
    old, rollout, mask = _behaviour_inputs()
    for mode in ("decoupled", "tis"):
        w = behaviour_weights(old, rollout, mask, mode=mode, cap=1.5)
        assert_close(w, torch.tensor([[1.5, 1.0, 0.25, 0.0]]))  # 2 truncated at 1.5
        assert not w.requires_grad


def test_behaviour_weights_filter_drops_tokens_above_the_cap_like_areal():
    old, rollout, mask = _behaviour_inputs()
    w = behaviour_weights(old, rollout, mask, mode="decoupled_filter", cap=1.5)
    assert_close(w, torch.tensor([[0.0, 1.0, 0.25, 0.0]]))


def test_behaviour_weights_none_is_one_on_trained_tokens():
    old, rollout, mask = _behaviour_inputs()
    w = behaviour_weights(old, rollout, mask, mode="none")
    assert_close(w, torch.tensor([[1.0, 1.0, 1.0, 0.0]]))


def test_behaviour_weight_scales_each_tokens_policy_gradient():
    # On-policy PPO with A = 1: loss −1 per token; weights [1.5, 1, .25] → token-mean
    # −(1.5 + 1 + .25) / 3 = −.916667, gradient −w / 3.
    old, rollout, mask = _behaviour_inputs()
    logprobs = old.detach().clone().requires_grad_()
    loss, _ = ppo_clip(logprobs, old.detach(), torch.ones(1, 4), mask)
    weights = behaviour_weights(old, rollout, mask, mode="decoupled", cap=1.5)
    total = aggregate(loss * weights, mask, "token-mean")
    assert_close(total, torch.tensor(-2.75 / 3))
    total.backward()
    assert_close(logprobs.grad, torch.tensor([[-0.5, -1 / 3, -0.25 / 3, 0.0]]))


def test_behaviour_weights_reject_unknown_modes_and_non_positive_caps():
    old, rollout, mask = _behaviour_inputs()
    with pytest.raises(ValueError, match="unknown off-policy correction 'magic'.*decoupled"):
        behaviour_weights(old, rollout, mask, mode="magic")
    with pytest.raises(ValueError, match="cap must be > 0"):
        behaviour_weights(old, rollout, mask, mode="tis", cap=0.0)
