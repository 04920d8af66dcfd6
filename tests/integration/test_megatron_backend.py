"""MegatronBackend against TorchBackend on the same tiny checkpoints (Qwen2 with tied embeddings
and qkv bias; Llama untied, no bias, another rope theta): equal logprobs, the same optimizer
steps, save/load, at TP=1 (in this process) and with TP / PP / DP of 2 (spawned follower ranks
over gloo on 127.0.0.1), always through the one object the controller uses."""

from __future__ import annotations

import contextlib
import random

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM

from asyncrl.config.job import AlgorithmConfig, TrainerConfig
from asyncrl.train.torch_backend import TorchBackend
from asyncrl.types import Group, Prompt, Reward, Sample, TrainBatch
from tests.helpers import save_tiny_model

pytest.importorskip("megatron.core")
from asyncrl.train.megatron.backend import MegatronBackend, TrainerRankFailed  # noqa: E402

pytestmark = pytest.mark.timeout(300)
# KL and entropy on, so the reference model and the entropy path are compared too; a clip
# below the first step's gradient norm (~0.4), so the global norm over TP shards matters.
ALGO = AlgorithmConfig(kl_coef=0.01, entropy_coef=0.01)
TRAINER = dict(micro_batch_size=5, minibatches=2, grad_clip=0.2)
KW = dict(temperature=0.9, max_new_tokens=8, total_steps=10, seed=0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.set_num_threads(1)
    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=57, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=False, rope_theta=5e5, max_position_embeddings=64)
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def _batch(groups: int = 3, n: int = 4, seed: int = 0) -> TrainBatch:
    rng = random.Random(seed)
    out = []
    for g in range(groups):
        prompt_ids = [rng.randrange(3, 55) for _ in range(rng.randint(3, 7))]
        samples = []
        for k in range(n):
            s = Sample(sample_id=f"{g}/{k}", prompt_id=str(g), prompt_ids=prompt_ids,
                       max_new_tokens=8)
            for _ in range(rng.randint(1, 8)):
                s.append(rng.randrange(3, 55), -2.0, 0)
            s.reward = Reward(value=rng.random())
            samples.append(s)
        out.append(Group(Prompt(str(g), "", prompt_ids), samples))
    return TrainBatch.from_groups(out, pad_token_id=0)


def _torch(model_dir) -> TorchBackend:
    return TorchBackend(str(model_dir), ALGO, TrainerConfig(**TRAINER), **KW)


@contextlib.contextmanager
def _megatron(model_dir, **parallel):
    backend = MegatronBackend(str(model_dir), ALGO,
                              TrainerConfig(backend="megatron", **TRAINER, **parallel), **KW)
    try:
        yield backend
    finally:
        backend.close()


def _assert_same_weights(got: dict, want: dict, atol: float) -> float:
    assert got.keys() == want.keys()
    worst = max(float((got[k] - want[k]).abs().max()) for k in want)
    assert worst <= atol, f"max |Δweight| = {worst:.3g}"
    return worst


@pytest.mark.parametrize("tp", [1, 2])
def test_megatron_logprobs_equal_torch_logprobs_for_the_same_weights(model_dir, tp):
    batch = _batch()
    want = _torch(model_dir).logprobs(batch)
    with _megatron(model_dir, tensor_parallel_size=tp) as backend:
        got = backend.logprobs(batch)
    real = batch.attention_mask  # padding positions are never used (see model.HFLogits)
    assert got.shape == want.shape
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=0)


def _slow(*values):
    return pytest.param(*values, marks=pytest.mark.slow)


@pytest.mark.parametrize("arch, tp, pp, dp", [
    ("qwen2", 1, 1, 1), ("qwen2", 2, 1, 1), ("qwen2", 1, 2, 1), ("llama", 2, 1, 1),
    _slow("llama", 1, 2, 1), _slow("qwen2", 1, 1, 2), _slow("qwen2", 2, 1, 2),
    _slow("qwen2", 2, 2, 1), _slow("qwen2", 1, 2, 2),
])
def test_megatron_step_updates_weights_like_torch(request, arch, tp, pp, dp):
    # Same batch, config and lr; two minibatches (two optimizer steps), micro-batches of 5.
    model_dir = request.getfixturevalue("model_dir" if arch == "qwen2" else "llama_dir")
    parallel = dict(tensor_parallel_size=tp, pipeline_parallel_size=pp, data_parallel_size=dp)
    batch = _batch()
    reference = _torch(model_dir)
    before = {k: v.clone() for k, v in reference.named_weights()}
    want_metrics = reference.step(batch)
    want = dict(reference.named_weights())
    with _megatron(model_dir, **parallel) as backend:
        got_metrics = backend.step(batch)
        got = {k: v.clone() for k, v in backend.named_weights()}
        assert backend.policy_version == reference.policy_version == 2
    for key in ("train/loss", "train/grad_norm", "train/kl", "train/entropy", "train/lr"):
        assert got_metrics[key] == pytest.approx(want_metrics[key], rel=1e-5, abs=1e-7), key
    # Adam moves an element by ~lr·g/(|g| + 1e-8): ~lr = 3e-4 for any real gradient, so a
    # wrong one shows at that size; fp32 noise of ~1e-10 on a near-zero gradient moves it by
    # up to lr·1e-10/1e-8 = 3e-6 (measured up to 3e-6). The clip is checked by grad_norm above.
    assert max(float((want[k] - before[k]).abs().max()) for k in want) > 1e-4
    _assert_same_weights(got, want, atol=2e-5)


def test_save_and_load_continue_the_same_trajectory(model_dir, tmp_path):
    batch = _batch()
    with _megatron(model_dir) as straight:
        straight.step(batch)
        straight.save(tmp_path / "ckpt")
        straight.step(batch)
        want = {k: v.clone() for k, v in straight.named_weights()}
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32)
    with _megatron(model_dir) as resumed:
        resumed.load(tmp_path / "ckpt")
        assert resumed.policy_version == 2
        loaded = dict(resumed.named_weights())
        resumed.step(batch)
        got = dict(resumed.named_weights())
    # The checkpoint is a plain HF model directory holding exactly the weights loaded back.
    _assert_same_weights(loaded, saved.state_dict(), atol=0.0)
    _assert_same_weights(got, want, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("field", ["tensor_parallel_size", "pipeline_parallel_size"])
def test_a_sharded_save_loads_in_the_same_layout_and_as_an_hf_model(model_dir, tmp_path, field):
    batch = _batch(seed=1)
    with _megatron(model_dir, **{field: 2}) as backend:
        backend.step(batch)
        backend.save(tmp_path / "ckpt")
        want = {k: v.clone() for k, v in backend.named_weights()}
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32)
    _assert_same_weights(saved.state_dict(), want, atol=0.0)
    with _megatron(model_dir, **{field: 2}) as resumed:
        resumed.load(tmp_path / "ckpt")
        _assert_same_weights(dict(resumed.named_weights()), want, atol=0.0)
    with _megatron(model_dir) as other, pytest.raises(ValueError, match=field):
        other.load(tmp_path / "ckpt")


def test_left_padded_rows_are_refused_not_mispositioned(model_dir):
    batch = _batch()
    batch.attention_mask = batch.attention_mask.flip(1)
    batch.input_ids = batch.input_ids.flip(1)
    with _megatron(model_dir) as backend, pytest.raises(ValueError, match="right-padded"):
        backend.logprobs(batch)


def test_parallel_sizes_are_checked_before_any_rank_starts(model_dir):
    with pytest.raises(ValidationError, match="needs trainer.backend=megatron"):
        TrainerConfig(tensor_parallel_size=2)
    with pytest.raises(ValidationError, match="trainer.pipeline_parallel_size"):
        TrainerConfig(pipeline_parallel_size=2)
    # The tiny model has 2 KV heads and 2 layers: 4 TP ranks would split a query group, 3
    # stages a layer.
    for field, size in (("tensor_parallel_size", 4), ("pipeline_parallel_size", 3)):
        with pytest.raises(ValueError, match=f"trainer.{field}"):
            MegatronBackend(str(model_dir), ALGO,
                            TrainerConfig(backend="megatron", **{field: size}), **KW)


def test_a_failing_follower_rank_fails_the_call_on_rank_0_instead_of_hanging(model_dir, tmp_path):
    # TP rank 1 cannot write its optimizer shard (a directory holds its file name): rank 0
    # must raise with rank 1's traceback attached, and the group must refuse further calls.
    (tmp_path / "ckpt" / "optimizer" / "tp1_pp0.pt").mkdir(parents=True)
    with _megatron(model_dir, tensor_parallel_size=2) as backend:
        with pytest.raises(Exception) as info:  # noqa: B017 - rank 0's own error is a gloo one
            backend.save(tmp_path / "ckpt")
        report = str(info.value) + "".join(getattr(info.value, "__notes__", []))
        assert "Is a directory" in report and "rank 1" in report, report
        with pytest.raises(TrainerRankFailed, match="closed"):
            backend.logprobs(_batch())


@pytest.mark.slow
def test_a_job_trains_end_to_end_with_the_megatron_backend_at_tp2(ray_local, tmp_path):
    # `asyncrl train --set trainer.backend=megatron --set trainer.tensor_parallel_size=2`: the
    # trainer actor drives a follower rank; rollouts get its weights each step and the engine's
    # logprobs match the trainer's; checkpoints and the final model are HF directories.
    from asyncrl.config import load_config
    from asyncrl.controller.run import run
    from asyncrl.metrics.report import read_metrics

    config = load_config(None, [
        f"run.output_dir={tmp_path}", "run.name=megatron", "run.steps=4", "run.eval_every=4",
        "run.checkpoint_every=2", "data.eval_size=20", "model.warm_start.steps=2",
        "trainer.backend=megatron", "trainer.tensor_parallel_size=2",
    ])
    result = run(config, progress=False)
    rows = [r for r in read_metrics(result.run_dir / "metrics.jsonl") if "train/loss" in r]
    assert [r["policy_version"] for r in rows] == [1, 2, 3, 4]
    assert max(r["train/mismatch_abs"] for r in rows) < 1e-4
    final = AutoModelForCausalLM.from_pretrained(result.final_model, dtype=torch.float32)
    init = AutoModelForCausalLM.from_pretrained(result.run_dir / "init_model", dtype=torch.float32)
    assert any(not torch.equal(a, b) for a, b in zip(final.state_dict().values(),
                                                      init.state_dict().values(), strict=True))
