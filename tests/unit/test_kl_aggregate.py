"""KL estimators, entropy and loss aggregation on hand-worked numbers."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from asyncrl.algo.aggregate import MODES, aggregate
from asyncrl.algo.kl import entropy_from_logits, kl_estimate

INF, NAN = float("inf"), float("nan")
LN2 = math.log(2.0)


def test_kl_estimators_hand_worked_in_both_directions():
    # d = logp − ref. Row 0: ln .5 − ln .25 = ln 2 = .693147; row 1: −ln 2.
    # k1 = d; k2 = ½ d² = .240227; k3 = e^(−d) + d − 1: .5 + .693147 − 1 = .193147 and
    # 2 − .693147 − 1 = .306853.
    logp = torch.log(torch.tensor([[0.5], [0.25]]))
    ref = torch.log(torch.tensor([[0.25], [0.5]]))
    assert_close(kl_estimate(logp, ref, "k1"), torch.tensor([[LN2], [-LN2]]))
    assert_close(kl_estimate(logp, ref, "k2"), torch.tensor([[0.5 * LN2**2]] * 2))
    assert_close(kl_estimate(logp, ref, "k3"), torch.tensor([[0.5 + LN2 - 1], [2 - LN2 - 1]]))


def test_kl_estimators_are_zero_when_the_policies_agree():
    logp = torch.log(torch.tensor([[0.1, 0.7, 0.2]]))
    for kind in ("k1", "k2", "k3"):
        assert_close(kl_estimate(logp, logp.clone(), kind), torch.zeros(1, 3))


def test_k2_and_k3_gradients_are_d_and_one_minus_the_inverse_ratio():
    # ∂k2/∂logp = d = ln 2; ∂k3/∂logp = 1 − e^(−d) = 1 − .5 = .5.
    ref = torch.log(torch.tensor([[0.25]]))
    for kind, expected in (("k2", LN2), ("k3", 0.5)):
        logp = torch.log(torch.tensor([[0.5]])).requires_grad_()
        kl_estimate(logp, ref, kind).sum().backward()
        assert_close(logp.grad, torch.tensor([[expected]]))


def test_k3_clamps_the_log_ratio_before_exponentiating_and_k1_k2_do_not():
    # d = −100: clamped to −10 → e^10 − 10 − 1 = 22015.4658 (unclamped it overflows to inf).
    logp, ref = torch.tensor([[-100.0]], requires_grad=True), torch.tensor([[0.0]])
    k3 = kl_estimate(logp, ref, "k3", clamp=10.0)
    assert_close(k3, torch.tensor([[math.exp(10) - 11]]))
    k3.sum().backward()
    assert logp.grad.item() == 0  # flat beyond the clamp
    assert kl_estimate(logp, ref, "k3", clamp=None).item() == INF
    assert kl_estimate(logp, ref, "k1").item() == -100
    assert kl_estimate(logp, ref, "k2").item() == 5000


def test_kl_with_a_mask_is_exactly_zero_and_gradient_free_on_masked_positions():
    logp = torch.tensor([[math.log(0.5), -INF, NAN]], requires_grad=True)
    ref = torch.tensor([[math.log(0.25), 0.0, -INF]])
    mask = torch.tensor([[True, False, False]])
    for kind in ("k1", "k2", "k3"):
        kl = kl_estimate(logp, ref, kind, loss_mask=mask)
        assert (kl[0, 1:] == 0).all() and torch.isfinite(kl).all()
        (grad,) = torch.autograd.grad(kl.sum(), logp)
        assert (grad[0, 1:] == 0).all() and torch.isfinite(grad).all()


def test_kl_rejects_an_unknown_estimator_and_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'; valid: k1, k2, k3"):
        kl_estimate(torch.zeros(1, 1), torch.zeros(1, 1), "k4")


def test_entropy_hand_worked():
    # Uniform over 4 → ln 4 = 1.386294. Logits [ln 3, 0] → p = [.75, .25] →
    # −(.75 ln .75 + .25 ln .25) = .562335. [0, −inf, −inf, 0] → uniform over 2 → ln 2.
    assert_close(entropy_from_logits(torch.zeros(1, 1, 4)), torch.tensor([[math.log(4)]]))
    two = torch.tensor([[[math.log(3.0), 0.0]]])
    assert_close(entropy_from_logits(two), torch.tensor([[-(0.75 * math.log(0.75)
                                                            + 0.25 * math.log(0.25))]]))
    masked = torch.tensor([[[0.0, -INF, -INF, 0.0]]], requires_grad=True)
    h = entropy_from_logits(masked)
    assert_close(h, torch.tensor([[LN2]]))
    h.sum().backward()
    # The maximum over the allowed entries: zero gradient, and no NaN from the −inf entries.
    assert_close(masked.grad, torch.zeros(1, 1, 4))


def test_entropy_is_float32_and_shaped_b_t():
    logits = torch.randn(2, 3, 5, dtype=torch.bfloat16)
    h = entropy_from_logits(logits)
    assert h.dtype == torch.float32 and h.shape == (2, 3)


# Row 0 trains 3 tokens, row 1 trains 1 (garbage after it), row 2 trains none (all garbage).
VALUES = torch.tensor([[1.0, 2.0, 3.0], [4.0, NAN, INF], [NAN, -INF, 5.0]])
MASK = torch.tensor([[True, True, True], [True, False, False], [False, False, False]])


def test_aggregation_modes_hand_worked():
    # Token sums 6, 4, 0; counts 3, 1, 0; B = 3 (the empty row counts as a sequence, adds 0).
    assert_close(aggregate(VALUES, MASK, "token-mean"), torch.tensor(10 / 4))
    assert_close(aggregate(VALUES, MASK, "seq-mean-token-sum"), torch.tensor(10 / 3))
    assert_close(aggregate(VALUES, MASK, "seq-mean-token-mean"), torch.tensor((2 + 4 + 0) / 3))
    assert_close(aggregate(VALUES, MASK, "seq-mean-token-sum-norm", norm_tokens=5),
                 torch.tensor(10 / (3 * 5)))


@pytest.mark.parametrize(
    ("mode", "row0", "row1"),
    [
        ("token-mean", 1 / 4, 1 / 4),  # every token 1 / Σ n
        ("seq-mean-token-sum", 1 / 2, 1 / 2),  # every token 1 / B
        ("seq-mean-token-mean", 1 / 6, 1 / 2),  # 1 / (B n_b): the short row's token weighs more
        ("seq-mean-token-sum-norm", 1 / 10, 1 / 10),  # 1 / (B N), N = 5
    ],
)
def test_aggregation_modes_weight_tokens_as_documented(mode, row0, row1):
    values = torch.zeros(2, 3, requires_grad=True)
    mask = torch.tensor([[True, True, True], [True, False, False]])
    aggregate(values, mask, mode, norm_tokens=5).backward()
    assert_close(values.grad, torch.tensor([[row0] * 3, [row1, 0.0, 0.0]]))


@pytest.mark.parametrize("mode", MODES)
def test_aggregation_of_an_empty_mask_is_zero_without_nan(mode):
    values = VALUES.clone().requires_grad_()
    total = aggregate(values, torch.zeros_like(MASK), mode, norm_tokens=5)
    assert total.item() == 0
    total.backward()
    assert (values.grad == 0).all()


def test_aggregation_of_an_empty_batch_is_zero():
    for mode in MODES:
        assert aggregate(torch.zeros(0, 4), torch.zeros(0, 4, dtype=torch.bool), mode,
                         norm_tokens=4).item() == 0


def test_aggregation_errors_name_the_problem():
    with pytest.raises(ValueError, match="needs norm_tokens > 0"):
        aggregate(VALUES, MASK, "seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="valid modes: token-mean, seq-mean-token-sum, "
                                         "seq-mean-token-mean, seq-mean-token-sum-norm"):
        aggregate(VALUES, MASK, "mean")
    with pytest.raises(ValueError, match="differ"):
        aggregate(VALUES, MASK[:, :2], "token-mean")
