"""TorchBackend on a real tiny model: micro-batching is exact, steps change weights and bump
the version, save/load resumes the same trajectory."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoTokenizer

from asyncrl.config.job import AlgorithmConfig, TrainerConfig
from asyncrl.train.torch_backend import TorchBackend
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


def test_minibatches_each_bump_the_version(model_dir):
    backend = _backend(model_dir, minibatches=3)
    backend.step(_batch(model_dir))
    assert backend.policy_version == 3


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
