"""CpuEngine against the teacher-forced reference forward, on a real tiny model."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from asyncrl.models.forward import token_logprobs
from asyncrl.rollout.engine import RolloutEngine
from asyncrl.rollout.engine.cpu import CpuEngine
from asyncrl.types import FinishReason, SamplingParams
from tests.helpers import as_batch, make_samples, save_tiny_model

PROMPTS = ["sort:31=", "sort:98765=", "ab", "12+34="]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.set_num_threads(1)
    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


async def _engine(model_dir, seed: int = 0) -> CpuEngine:
    return CpuEngine(str(model_dir), seed=seed)


def _max_logprob_error(model, samples, pad_id: int, temperature: float) -> float:
    batch = as_batch(samples, pad_id)
    reference, _ = token_logprobs(model, batch.input_ids, batch.attention_mask, temperature)
    return float(((reference - batch.rollout_logprobs).abs() * batch.loss_mask).max())


@pytest.mark.parametrize("temperature", [1.0, 0.7])
async def test_engine_logprobs_equal_reference_logprobs_for_the_same_weights(
    model_dir, tokenizer, temperature
):
    engine = await _engine(model_dir)
    assert isinstance(engine, RolloutEngine)
    samples = make_samples(tokenizer, PROMPTS, n=3, max_new_tokens=12)
    await engine.generate(samples, SamplingParams(temperature=temperature, top_p=0.9))
    assert all(len(s.response_ids) == len(s.rollout_logprobs) == len(s.token_versions) > 0
               for s in samples)
    assert _max_logprob_error(engine.model, samples, tokenizer.pad_token_id, temperature) <= 1e-5
    await engine.close()


async def test_samples_of_one_prompt_differ_and_greedy_is_the_argmax(model_dir, tokenizer):
    engine = await _engine(model_dir)
    sampled = make_samples(tokenizer, ["sort:123="], n=6, max_new_tokens=10)
    await engine.generate(sampled, SamplingParams(temperature=1.0))
    assert len({tuple(s.response_ids) for s in sampled}) > 1
    greedy = make_samples(tokenizer, ["sort:123=", "sort:123="], n=1, max_new_tokens=10)
    await engine.generate(greedy, SamplingParams(temperature=0.0))
    assert greedy[0].response_ids == greedy[1].response_ids
    batch = as_batch(greedy[:1], tokenizer.pad_token_id)
    logits = engine.model(input_ids=batch.input_ids).logits[0]
    prompt_len = len(greedy[0].prompt_ids)
    for i, token in enumerate(greedy[0].response_ids):
        assert token == int(logits[prompt_len - 1 + i].argmax())
    await engine.close()


async def test_max_new_tokens_and_eos_end_a_sample(model_dir, tokenizer):
    engine = await _engine(model_dir)
    samples = make_samples(tokenizer, ["sort:1="], n=2, max_new_tokens=5)
    await engine.generate(samples, SamplingParams(temperature=1.0))
    assert all(s.finish_reason is FinishReason.LENGTH and len(s.response_ids) == 5
               for s in samples if tokenizer.eos_token_id not in s.response_ids)
    # Make EOS the only sensible next token: a huge bias on its output embedding row.
    eos_model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        eos_model.lm_head.weight[tokenizer.eos_token_id] = 50 * eos_model.lm_head.weight[
            tokenizer.eos_token_id].sign()
    await engine.update_weights(eos_model.state_dict().items(), policy_version=1)
    stops = make_samples(tokenizer, ["sort:1="], n=2, max_new_tokens=5)
    await engine.generate(stops, SamplingParams(temperature=0.0))
    for s in stops:
        assert s.finish_reason is FinishReason.STOP
        assert s.response_ids[-1] == tokenizer.eos_token_id and s.token_versions[-1] == 1
    await engine.close()


async def test_abort_returns_partials_that_resume_from_their_tokens(model_dir, tokenizer):
    engine = await _engine(model_dir)
    samples = make_samples(tokenizer, ["sort:98765=", "ab"], n=2, max_new_tokens=60)
    params = SamplingParams(temperature=1.0)
    task = asyncio.create_task(engine.generate(samples, params))
    for _ in range(5):
        await asyncio.sleep(0)  # let a few decoding steps run
    await engine.abort()
    await task
    partial = [s for s in samples if s.finish_reason is FinishReason.ABORT]
    assert partial, "abort after a few steps must leave unfinished samples"
    for s in partial:
        assert 0 < len(s.response_ids) < 60
        assert len(s.response_ids) == len(s.rollout_logprobs) == len(s.token_versions)
    before = {s.sample_id: list(s.response_ids) for s in partial}
    await engine.generate(partial, params)
    for s in partial:
        assert s.response_ids[: len(before[s.sample_id])] == before[s.sample_id]
        assert s.finish_reason in (FinishReason.STOP, FinishReason.LENGTH)
    assert _max_logprob_error(engine.model, partial, tokenizer.pad_token_id, 1.0) <= 1e-5
    await engine.close()


async def test_weight_update_mid_generation_switches_version_and_logprobs(model_dir, tokenizer):
    engine = await _engine(model_dir)
    old_model = AutoModelForCausalLM.from_pretrained(model_dir)
    new_model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        for p in new_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    samples = make_samples(tokenizer, ["sort:98765=", "12+34="], n=2, max_new_tokens=40)
    task = asyncio.create_task(engine.generate(samples, SamplingParams(temperature=1.0)))
    for _ in range(4):
        await asyncio.sleep(0)
    await engine.update_weights(new_model.state_dict().items(), policy_version=7)
    await task
    for s in samples:
        assert s.token_versions == sorted(s.token_versions)  # non-decreasing
        assert s.token_versions[-1] == 7 and s.token_versions[0] == 0
        # Each token's logprob belongs to the weights of its version.
        batch = as_batch([s], tokenizer.pad_token_id)
        with torch.no_grad():
            old, _ = token_logprobs(old_model, batch.input_ids, batch.attention_mask)
            new, _ = token_logprobs(new_model, batch.input_ids, batch.attention_mask)
        p = len(s.prompt_ids)
        for i, version in enumerate(s.token_versions):
            expected = (new if version == 7 else old)[0, p + i]
            assert abs(float(expected) - s.rollout_logprobs[i]) <= 1e-5
    await engine.close()


async def test_concurrent_requests_join_the_running_batch(model_dir, tokenizer):
    engine = await _engine(model_dir)
    params = SamplingParams(temperature=1.0)
    first = make_samples(tokenizer, ["sort:98765="], n=2, max_new_tokens=30)
    running = asyncio.create_task(engine.generate(first, params))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    later = [make_samples(tokenizer, [p], n=2, max_new_tokens=20) for p in PROMPTS]
    for group in later:
        for s in group:
            s.sample_id = f"late-{s.sample_id}-{id(group)}"
    await asyncio.gather(running, *(engine.generate(g, params) for g in later))
    everything = first + [s for g in later for s in g]
    assert all(s.is_finished for s in everything)
    assert _max_logprob_error(engine.model, everything, tokenizer.pad_token_id, 1.0) <= 1e-5
    await engine.close()


async def test_unknown_weight_name_is_a_clear_error(model_dir):
    engine = await _engine(model_dir)
    with pytest.raises(KeyError, match="no parameter 'nope.weight'"):
        await engine.update_weights([("nope.weight", torch.zeros(1))], policy_version=1)
    await engine.close()


async def test_engine_logprobs_equal_the_torch_trainers_recomputed_logprobs(model_dir, tokenizer):
    from asyncrl.config.job import AlgorithmConfig, TrainerConfig
    from asyncrl.train.torch_backend import TorchBackend

    engine = await _engine(model_dir)
    samples = make_samples(tokenizer, PROMPTS, n=2, max_new_tokens=12)
    await engine.generate(samples, SamplingParams(temperature=0.8))
    trainer = TorchBackend(str(model_dir), AlgorithmConfig(), TrainerConfig(micro_batch_size=3),
                           temperature=0.8, max_new_tokens=12, total_steps=1, seed=0)
    batch = as_batch(samples, tokenizer.pad_token_id)
    recomputed = trainer.logprobs(batch)
    error = ((recomputed - batch.rollout_logprobs).abs() * batch.loss_mask).max()
    assert float(error) <= 1e-5
    await engine.close()
