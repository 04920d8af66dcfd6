"""TorchBackend on a real tiny model: micro-batching is exact, steps change weights and bump
the version, save/load resumes the same trajectory."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoTokenizer

from asyncrl.config.job import AlgorithmConfig, TrainerConfig
from asyncrl.train.torch_backend import TorchBackend, lr_factor
from asyncrl.types import Group, Prompt, Reward, Sample, TrainBatch
from tests.helpers import save_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.set_num_threads(1)
    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


def _batch(model_dir, groups: int = 3, n: int = 4) -> TrainBatch:
    tok = AutoTokenizer.from_pretrained(model_dir)
    rng = random.Random(0)
    out = []
    for g in range(groups):
        prompt_ids = tok(f"sort:{rng.randrange(10**4)}=").input_ids
        samples = []
        for k in range(n):
            length = rng.randint(1, 6)
            s = Sample(sample_id=f"{g}/{k}", prompt_id=str(g), prompt_ids=prompt_ids,
                       max_new_tokens=8)
            for _ in range(length):
                s.append(rng.randrange(3, len(tok)), -2.0, 0)
            s.reward = Reward(value=rng.random())
            samples.append(s)
        out.append(Group(Prompt(str(g), "", prompt_ids), samples))
    return TrainBatch.from_groups(out, tok.pad_token_id)


def _backend(model_dir, **trainer) -> TorchBackend:
    return TorchBackend(str(model_dir), AlgorithmConfig(kl_coef=0.01, aggregation=trainer.pop(
        "aggregation", "token-mean")), TrainerConfig(**trainer), temperature=1.0,
        max_new_tokens=8, total_steps=10, seed=0)


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean"])
def test_micro_batching_gives_the_same_update_as_one_big_batch(model_dir, aggregation):
    batch = _batch(model_dir)
    whole = _backend(model_dir, micro_batch_size=64, aggregation=aggregation)
    pieces = _backend(model_dir, micro_batch_size=5, aggregation=aggregation)
    before = {k: v.clone() for k, v in whole.named_weights()}
    m1, m2 = whole.step(batch), pieces.step(batch)
    assert m1["train/loss"] == pytest.approx(m2["train/loss"], abs=1e-6)
    # Compare gradients: Adam's first step is ~lr·sign(g), which flips on rounding noise.
    grads = zip(whole.model.named_parameters(), pieces.model.named_parameters(), strict=True)
    for (name, a), (_, b) in grads:
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-4, msg=name)
    changed = [name for name, t in whole.named_weights() if not torch.equal(t, before[name])]
    assert changed and whole.policy_version == pieces.policy_version == 1


@pytest.mark.parametrize("loss", ["ppo_clip", "dual_clip", "dapo", "gspo", "cispo"])
@pytest.mark.parametrize("advantage", ["grpo", "dr_grpo", "rloo", "reinforce_pp"])
def test_every_loss_and_advantage_trains_from_config(model_dir, loss, advantage):
    backend = TorchBackend(str(model_dir), AlgorithmConfig(loss=loss, advantage=advantage),
                           TrainerConfig(), temperature=1.0, max_new_tokens=8, total_steps=1,
                           seed=0)
    before = {k: v.clone() for k, v in backend.named_weights()}
    metrics = backend.step(_batch(model_dir))
    assert all(v == v for v in metrics.values())  # no NaN
    assert any(not torch.equal(t, before[k]) for k, t in backend.named_weights())


@pytest.mark.parametrize("groups, n, minibatches", [(3, 4, 3), (3, 2, 4), (5, 3, 4)])
def test_minibatches_each_bump_the_version(model_dir, groups, n, minibatches):
    # 6 rows into 4 minibatches, 15 into 4: chunk() would make only 3 (the version would lag)
    backend = _backend(model_dir, minibatches=minibatches)
    backend.step(_batch(model_dir, groups, n))
    assert backend.policy_version == minibatches


def test_save_and_load_continue_the_same_trajectory(model_dir, tmp_path):
    batch = _batch(model_dir)
    straight = _backend(model_dir, lr_schedule="linear")
    straight.step(batch)
    straight.save(tmp_path / "ckpt")
    straight.step(batch)
    resumed = _backend(model_dir, lr_schedule="linear")
    resumed.load(tmp_path / "ckpt")
    assert resumed.policy_version == 1
    resumed.step(batch)
    for (name, a), (_, b) in zip(straight.named_weights(), resumed.named_weights(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


def test_learning_rate_schedules_hand_worked():
    linear = lr_factor("linear", total_steps=100, warmup_steps=0, min_ratio=0.1)
    assert [linear(0), linear(50), linear(100), linear(200)] == pytest.approx([1, 0.55, 0.1, 0.1])
    cosine = lr_factor("cosine", total_steps=110, warmup_steps=10, min_ratio=0.0)
    assert [cosine(0), cosine(9), cosine(10), cosine(60), cosine(110)] == pytest.approx(
        [0.1, 1.0, 1.0, 0.5, 0.0], abs=1e-9)
    assert lr_factor("constant", total_steps=5, warmup_steps=0, min_ratio=0.1)(4) == 1.0
