"""Off-policy expert data (CHORD): μ's schedule, the token-weighted SFT term, expert rows in a
TrainBatch, and the objective's accumulation being exactly (1 − μ)·L_RL + μ·L_SFT."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from asyncrl.algo.aggregate import aggregate
from asyncrl.algo.expert import expert_coefficient, expert_sft_loss
from asyncrl.config.job import AlgorithmConfig
from asyncrl.data.expert import expert_sample
from asyncrl.models.tiny import build_char_tokenizer
from asyncrl.train.objective import PolicyObjective
from asyncrl.types import FinishReason, Group, Prompt, Reward, Sample, TrainBatch


def test_the_coefficient_follows_its_schedule_from_start_to_end():
    mu = lambda step, schedule: expert_coefficient(  # noqa: E731
        step, 11, start=0.8, end=0.2, schedule=schedule)
    assert [mu(s, "constant") for s in (0, 5, 10)] == [0.8, 0.8, 0.8]
    assert_close(torch.tensor([mu(s, "linear") for s in (0, 5, 10, 20)]),
                 torch.tensor([0.8, 0.5, 0.2, 0.2]))
    assert_close(torch.tensor([mu(s, "cosine") for s in (0, 5, 10)]),
                 torch.tensor([0.8, 0.5, 0.2]))
    assert mu(2, "cosine") > mu(2, "linear")  # a cosine stays near the start longer
    with pytest.raises(ValueError, match="unknown expert schedule"):
        expert_coefficient(0, 10, start=0.5, end=0.1, schedule="step")


def test_the_sft_term_is_the_nll_or_its_p_one_minus_p_weighting_and_masks_exactly():
    logprobs = torch.tensor([[-0.1, -2.0, -float("inf")], [-0.7, -0.3, -5.0]],
                            requires_grad=True)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    plain, nll = expert_sft_loss(logprobs, mask, "none")
    weighted, nll_again = expert_sft_loss(logprobs, mask, "p_one_minus_p")
    p = logprobs.detach().exp()
    expected = torch.where(mask, -logprobs.detach() * p * (1 - p), torch.zeros(2, 3))
    assert_close(plain.detach(), torch.where(mask, -logprobs.detach(), torch.zeros(2, 3)))
    assert_close(weighted.detach(), expected)
    assert_close(nll, nll_again)
    assert_close(nll, torch.tensor((0.1 + 2.0 + 0.7 + 0.3 + 5.0) / 5))
    weighted.sum().backward()
    assert torch.isfinite(logprobs.grad).all() and logprobs.grad[0, 2] == 0
    # φ is a weight, not a path for gradients: d/dlogp of −logp·φ is −φ
    assert_close(logprobs.grad[mask], -(p * (1 - p))[mask])
    with pytest.raises(ValueError, match="unknown token weighting"):
        expert_sft_loss(logprobs, mask, "phi")


def _sample(sid: str, prompt_id: str, response: list[int], reward: float) -> Sample:
    s = Sample(sample_id=sid, prompt_id=prompt_id, prompt_ids=[1, 2], max_new_tokens=8)
    for token in response:
        s.append(token, -0.5, 0)
    s.finish_reason, s.reward = FinishReason.STOP, Reward(reward)
    return s


def _batch(mu: float, with_expert: bool = True) -> TrainBatch:
    groups = [Group(Prompt(f"p{g}", "", [1, 2]),
                    [_sample(f"p{g}/{k}", f"p{g}", [3 + k] * (2 + k + g), float(k))
                     for k in range(2)]) for g in range(2)]
    tokenizer = build_char_tokenizer()
    expert = [expert_sample(Prompt(f"p{g}", "", [1, 2], answer="12" * (g + 1)), "answer",
                            tokenizer, 8) for g in range(2)] if with_expert else []
    return TrainBatch.from_groups(groups, 0, expert=expert, expert_coef=mu)


def test_expert_samples_follow_their_group_with_no_behaviour_and_no_advantage():
    batch = _batch(0.3)
    assert batch.sample_ids == ["p0/0", "p0/1", "p0/expert", "p1/0", "p1/1", "p1/expert"]
    assert batch.expert_rows.tolist() == [False, False, True, False, False, True]
    assert batch.rewards[batch.expert_rows].tolist() == [0.0, 0.0]
    assert len(set(batch.group_ids.tolist())) == 4  # each expert row a group of its own
    tokenizer = build_char_tokenizer()
    row = batch.sample_ids.index("p1/expert")
    expected = tokenizer("1212", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    assert batch.input_ids[row, 2 : 2 + len(expected)].tolist() == expected
    assert batch.loss_mask[row].sum() == len(expected)
    objective = PolicyObjective(AlgorithmConfig(), max_new_tokens=8)
    assert (objective.advantages(batch)[batch.expert_rows] == 0).all()
    assert batch.take(torch.tensor([2, 3])).expert_rows.tolist() == [True, False]


@pytest.mark.parametrize("advantage", ["grpo", "rloo", "reinforce_pp"])
def test_expert_rows_do_not_move_the_policy_rows_advantages(advantage):
    # reinforce_pp's batch std would shrink if the expert rows' zeros counted
    objective = PolicyObjective(AlgorithmConfig(advantage=advantage), max_new_tokens=8)
    mixed, plain = _batch(0.3), _batch(0.3, with_expert=False)
    policy = ~mixed.expert_rows
    width = plain.input_ids.shape[1]
    assert_close(objective.advantages(mixed)[policy][:, :width], objective.advantages(plain))


def _accumulated_grad(batch: TrainBatch, theta: torch.Tensor, micro_batch_size: int,
                      weighting: str, aggregation: str = "token-mean",
                      parts: int = 1) -> tuple[torch.Tensor, dict]:
    """Gradient of the objective's accumulation, with a 'model' whose logprobs are `theta`;
    `parts` > 1 accumulates the rows in that many parts of one minibatch, as data-parallel
    ranks do (each with minibatch_rows = the whole)."""
    objective = PolicyObjective(AlgorithmConfig(expert_token_weighting=weighting,
                                                aggregation=aggregation), max_new_tokens=8)
    old = theta.detach() - 0.2
    tensors, _ = objective.step_tensors(batch, old, None)
    index = {sid: i for i, sid in enumerate(batch.sample_ids)}

    def forward(mb: TrainBatch, with_entropy: bool = False):
        rows = torch.tensor([index[sid] for sid in mb.sample_ids])
        return theta[rows, : mb.input_ids.shape[1]], None

    theta.grad = None
    whole = torch.arange(batch.size)
    for part in whole.tensor_split(parts):
        sums = objective.accumulate(batch, tensors, part, micro_batch_size=micro_batch_size,
                                    forward=forward, minibatch_rows=whole)
    return theta.grad.clone(), sums


AGGREGATIONS = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean",
                "seq-mean-token-sum-norm"]


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("weighting", ["none", "p_one_minus_p"])
def test_accumulation_is_exactly_the_mixture_of_the_two_normalised_terms(weighting, aggregation):
    batch, mu = _batch(0.3), 0.3
    theta = (-torch.rand(batch.size, batch.input_ids.shape[1],
                         generator=torch.Generator().manual_seed(0)) - 0.1).requires_grad_()
    grad_1, sums = _accumulated_grad(batch, theta, 1, weighting, aggregation)
    grad_all, _ = _accumulated_grad(batch, theta, 64, weighting, aggregation)
    grad_ranks, _ = _accumulated_grad(batch, theta, 2, weighting, aggregation, parts=2)
    assert_close(grad_1, grad_all)  # micro-batching does not change the gradient
    assert_close(grad_ranks, grad_all)  # nor does splitting the minibatch over ranks

    objective = PolicyObjective(AlgorithmConfig(expert_token_weighting=weighting,
                                                aggregation=aggregation), max_new_tokens=8)
    tensors, _ = objective.step_tensors(batch, theta.detach() - 0.2, None)
    policy, expert = ~batch.expert_rows, batch.expert_rows
    rl, _ = objective.micro_loss(theta[policy], None, batch.loss_mask[policy],
                                 {k: v[policy] for k, v in tensors.items()})
    sft, _ = expert_sft_loss(theta[expert], batch.loss_mask[expert], weighting)
    theta.grad = None
    ((1 - mu) * rl + mu * aggregate(sft, batch.loss_mask[expert], "token-mean")).backward()
    assert_close(grad_1, theta.grad)
    assert math.isfinite(sums["train/expert_nll"]) and sums["train/expert_nll"] > 0


def test_with_mu_zero_the_expert_rows_change_nothing():
    with_expert = _batch(0.0)
    plain = _batch(0.0, with_expert=False)
    theta_with = (-torch.rand(with_expert.size, with_expert.input_ids.shape[1],
                              generator=torch.Generator().manual_seed(1)) - 0.1)
    grad, sums = _accumulated_grad(with_expert, theta_with.clone().requires_grad_(), 2, "none")
    policy = ~with_expert.expert_rows
    theta_plain = theta_with[policy][:, : plain.input_ids.shape[1]].clone().requires_grad_()
    grad_plain, _ = _accumulated_grad(plain, theta_plain, 2, "none")
    assert (grad[with_expert.expert_rows] == 0).all()
    assert_close(grad[policy][:, : plain.input_ids.shape[1]], grad_plain)
    assert "train/expert_nll" not in sums
