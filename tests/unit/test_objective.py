"""PolicyObjective maps every AlgorithmConfig field onto asyncrl.algo: for each field, the
objective's loss equals the loss composed by hand from the algo functions with that setting,
and differs from the loss without it (so a field the objective ignored would fail here)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pytest
import torch
from torch.testing import assert_close

from asyncrl.algo import advantages as adv_lib
from asyncrl.algo.aggregate import aggregate
from asyncrl.algo.kl import kl_estimate
from asyncrl.algo.losses import POLICY_LOSSES, behaviour_weights
from asyncrl.config import load_config
from asyncrl.config.job import AlgorithmConfig
from asyncrl.errors import ConfigError
from asyncrl.train.objective import PolicyObjective
from asyncrl.types import TrainBatch

B, T = 6, 5
MAX_NEW_TOKENS = 8  # != T, so seq-mean-token-sum-norm must use the config's N, not the width
LENGTHS = [5, 3, 1, 4, 2, 5]  # unequal, so the aggregation modes disagree


@dataclass
class Inputs:
    batch: TrainBatch
    logprobs: torch.Tensor  # current policy, a leaf
    old: torch.Tensor
    ref: torch.Tensor
    entropy: torch.Tensor


def _inputs() -> Inputs:
    g = torch.Generator().manual_seed(0)
    mask = torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]
    logprobs = -2 * torch.rand(B, T, generator=g)
    # log-ratios of ~±1.5: many tokens clipped, some past the dual-clip bound
    old = logprobs - 1.5 * torch.randn(B, T, generator=g)
    rollout = old - torch.randn(B, T, generator=g)
    rollout[1, 0] = old[1, 0] - 1.5  # a behaviour weight of e^1.5, past the default cap of 2
    ref = logprobs + torch.randn(B, T, generator=g)
    ref[0, 0] = logprobs[0, 0] + 12.0  # |d| past the default k3 clamp of 10
    zeros = torch.zeros(B, T, dtype=torch.long)
    batch = TrainBatch(
        input_ids=zeros, attention_mask=torch.ones(B, T, dtype=torch.bool), loss_mask=mask,
        rollout_logprobs=rollout, token_versions=zeros,
        rewards=torch.tensor([1.0, 0.0, 0.5, 0.2, 0.9, 0.7]),  # group stds far from 1
        group_ids=torch.tensor([0, 0, 0, 1, 1, 1]))
    return Inputs(batch, logprobs.requires_grad_(), old, ref, 3 * torch.rand(B, T, generator=g))


def _objective_loss(x: Inputs, **fields) -> torch.Tensor:
    objective = PolicyObjective(AlgorithmConfig(**fields), max_new_tokens=MAX_NEW_TOKENS)
    ref = x.ref if objective.algo.kl_coef else None
    tensors, _ = objective.step_tensors(x.batch, x.old, ref)
    entropy = x.entropy if objective.with_entropy else None
    loss, _ = objective.micro_loss(x.logprobs, entropy, x.batch.loss_mask, tensors)
    return loss


def _algo_loss(x: Inputs, *, advantage=adv_lib.grpo, loss="ppo_clip", loss_kwargs=None,
               correction="decoupled", cap=2.0, kl=None, entropy_coef=0.0,
               aggregation="token-mean") -> torch.Tensor:
    """The loss composed directly from asyncrl.algo; defaults are AlgorithmConfig's."""
    mask = x.batch.loss_mask
    adv = adv_lib.expand_to_tokens(advantage(x.batch.rewards, x.batch.group_ids), mask)
    per_token, _ = POLICY_LOSSES[loss](x.logprobs, x.old, adv, mask, **(loss_kwargs or {}))
    per_token = per_token * behaviour_weights(x.old, x.batch.rollout_logprobs, mask,
                                              mode=correction, cap=cap)
    if kl is not None:
        kind, coef, clamp = kl
        per_token = per_token + coef * kl_estimate(x.logprobs, x.ref, kind, clamp, loss_mask=mask)
    per_token = per_token - entropy_coef * x.entropy
    return aggregate(per_token, mask, aggregation, norm_tokens=MAX_NEW_TOKENS)


# (config fields, the same without the field under test, the algo composition it must equal)
CASES = {
    "aggregation=seq-mean-token-sum": (
        {"aggregation": "seq-mean-token-sum"}, {}, {"aggregation": "seq-mean-token-sum"}),
    "aggregation=seq-mean-token-mean": (
        {"aggregation": "seq-mean-token-mean"}, {}, {"aggregation": "seq-mean-token-mean"}),
    "aggregation=seq-mean-token-sum-norm": (
        {"aggregation": "seq-mean-token-sum-norm"}, {},
        {"aggregation": "seq-mean-token-sum-norm"}),
    "kl_coef": ({"kl_coef": 0.1}, {}, {"kl": ("k3", 0.1, 10.0)}),
    "kl_estimator=k1": (
        {"kl_coef": 0.1, "kl_estimator": "k1"}, {"kl_coef": 0.1}, {"kl": ("k1", 0.1, None)}),
    "kl_estimator=k2": (
        {"kl_coef": 0.1, "kl_estimator": "k2"}, {"kl_coef": 0.1}, {"kl": ("k2", 0.1, None)}),
    "kl_clamp=0.5": (
        {"kl_coef": 0.1, "kl_clamp": 0.5}, {"kl_coef": 0.1}, {"kl": ("k3", 0.1, 0.5)}),
    "kl_clamp=None": (
        {"kl_coef": 0.1, "kl_clamp": None}, {"kl_coef": 0.1}, {"kl": ("k3", 0.1, None)}),
    "off_policy_correction=none": (
        {"off_policy_correction": "none"}, {}, {"correction": "none"}),
    "off_policy_correction=decoupled_filter": (
        {"off_policy_correction": "decoupled_filter"}, {}, {"correction": "decoupled_filter"}),
    "behaviour_weight_cap": ({"behaviour_weight_cap": 1.5}, {}, {"cap": 1.5}),
    "normalize_std=False": (
        {"normalize_std": False}, {},
        {"advantage": lambda r, g: adv_lib.grpo(r, g, normalize_std=False)}),
    "clip_low": ({"clip_low": 0.1}, {}, {"loss_kwargs": {"clip_low": 0.1}}),
    "clip_high": ({"clip_high": 0.4}, {}, {"loss_kwargs": {"clip_high": 0.4}}),
    "entropy_coef": ({"entropy_coef": 0.1}, {}, {"entropy_coef": 0.1}),
    "advantage=dr_grpo": ({"advantage": "dr_grpo"}, {}, {"advantage": adv_lib.dr_grpo}),
    "advantage=rloo": ({"advantage": "rloo"}, {}, {"advantage": adv_lib.rloo}),
    "advantage=reinforce_pp": (
        {"advantage": "reinforce_pp"}, {}, {"advantage": adv_lib.reinforce_pp_baseline}),
    "loss=dual_clip": ({"loss": "dual_clip"}, {}, {"loss": "dual_clip"}),
    "dual_clip_c": (
        {"loss": "dual_clip", "dual_clip_c": 1.5}, {"loss": "dual_clip"},
        {"loss": "dual_clip", "loss_kwargs": {"clip_c": 1.5}}),
    "loss=dapo": ({"loss": "dapo"}, {}, {"loss": "dapo"}),
    "loss=gspo": ({"loss": "gspo"}, {}, {"loss": "gspo"}),
    "loss=gspo+clips": (
        {"loss": "gspo", "clip_low": 0.01, "clip_high": 0.02}, {"loss": "gspo"},
        {"loss": "gspo", "loss_kwargs": {"clip_low": 0.01, "clip_high": 0.02}}),
    "loss=cispo": ({"loss": "cispo"}, {}, {"loss": "cispo"}),
}


@pytest.mark.parametrize("fields, without, composed", CASES.values(), ids=CASES.keys())
def test_each_algorithm_field_changes_the_loss_exactly_as_asyncrl_algo_computes_it(
        fields, without, composed):
    x = _inputs()
    loss = _objective_loss(x, **fields)
    assert_close(loss, _algo_loss(x, **composed))
    other = _objective_loss(x, **without)
    assert not torch.isclose(loss, other, rtol=1e-4, atol=1e-6), (loss, other)


def test_equivalent_settings_give_the_same_loss():
    # documented equivalences, not fields the objective forgot
    x = _inputs()
    assert_close(_objective_loss(x, off_policy_correction="tis"), _objective_loss(x))
    assert_close(_objective_loss(x, advantage="dr_grpo"), _objective_loss(x, normalize_std=False))
    assert_close(_objective_loss(x, loss="dapo"), _objective_loss(x, clip_high=0.28))
    assert_close(_objective_loss(x, kl_estimator="k1"), _objective_loss(x))  # kl_coef = 0


def test_an_unclamped_k3_gets_no_nan_gradient_from_padding():
    # padding holds whatever the forward left there; exp(-d) of it must never reach backward
    x = _inputs()
    with torch.no_grad():
        x.logprobs[~x.batch.loss_mask] = -1e4
    loss = _objective_loss(x, kl_coef=0.1, kl_clamp=None)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.logprobs.grad).all()
    assert (x.logprobs.grad[~x.batch.loss_mask] == 0).all()


def test_kl_clamp_and_dual_clip_c_are_validated_and_null_disables_the_clamp():
    assert load_config(None, ["algorithm.kl_clamp=null"]).algorithm.kl_clamp is None
    defaults = AlgorithmConfig()
    assert (defaults.kl_clamp, defaults.dual_clip_c) == (10.0, 3.0)
    for override, message in (("algorithm.dual_clip_c=1", "algorithm.dual_clip_c"),
                              ("algorithm.kl_clamp=0", "algorithm.kl_clamp")):
        with pytest.raises(ConfigError, match=message):
            load_config(None, [override])


@pytest.mark.parametrize("overrides, field, applies_to", [
    (["algorithm.dual_clip_c=2"], "dual_clip_c", "loss=dual_clip"),
    (["algorithm.normalize_std=false", "algorithm.advantage=rloo"], "normalize_std",
     "advantage=grpo"),
    (["algorithm.kl_clamp=5"], "kl_clamp", "kl_estimator=k3 with kl_coef > 0"),
    (["algorithm.kl_estimator=k2"], "kl_estimator", "kl_coef > 0"),
    (["algorithm.behaviour_weight_cap=3", "algorithm.off_policy_correction=none"],
     "behaviour_weight_cap", "an off_policy_correction"),
])
def test_a_field_of_an_unselected_option_is_reported_as_ignored(
        caplog, overrides, field, applies_to):
    with caplog.at_level(logging.WARNING, logger="asyncrl.config.job"):
        load_config(None, overrides)
    assert f"algorithm.{field} only applies to {applies_to}, so it is ignored" in caplog.text


def test_fields_of_selected_options_are_not_reported(caplog):
    with caplog.at_level(logging.WARNING, logger="asyncrl.config.job"):
        load_config(None, ["algorithm.loss=dual_clip", "algorithm.dual_clip_c=2",
                           "algorithm.kl_coef=0.1", "algorithm.kl_clamp=5",
                           "algorithm.normalize_std=false"])
    assert "ignored" not in caplog.text


def test_a_resolved_config_with_every_field_listed_reports_nothing(caplog):
    # a resumed run reads config.resolved.yaml, where every field is set (to its default)
    resolved = AlgorithmConfig().model_dump()
    with caplog.at_level(logging.WARNING, logger="asyncrl.config.job"):
        AlgorithmConfig(**resolved)
    assert "ignored" not in caplog.text
