"""CpuEngine against the teacher-forced reference forward (`token_logprobs`), on a real tiny
model: logprobs, sampling, stopping, abort/resume, weight updates, continuous batching."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from asyncrl.models.forward import position_ids_from_mask, token_logprobs
from asyncrl.rollout.engine import RolloutEngine
from asyncrl.rollout.engine.cpu import CpuEngine
from asyncrl.types import FinishReason, Sample, SamplingParams
from tests.helpers import as_batch, make_samples, save_tiny_model

PROMPTS = ["sort:31=", "sort:98765=", "ab", "12+34="]  # different lengths: padding is exercised
TOLERANCE = 1e-5  # fp32; the project's acceptance bound for engine vs trainer logprobs


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.set_num_threads(1)
    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture
async def engine(model_dir):
    engine = CpuEngine(str(model_dir), seed=0)
    yield engine
    await engine.close()


def _load(model_dir) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@torch.no_grad()
def _reference(model, samples: list[Sample], pad_id: int, temperature: float = 1.0):
    """Right-padded batch of `samples` and its reference per-token logprobs [B, T]."""
    batch = as_batch(samples, pad_id)
    reference, _ = token_logprobs(model, batch.input_ids, batch.attention_mask, temperature)
    return batch, reference


def _max_logprob_error(model, samples, pad_id: int, temperature: float = 1.0) -> float:
    batch, reference = _reference(model, samples, pad_id, temperature)
    return float(((reference - batch.rollout_logprobs).abs() * batch.loss_mask).max())


async def _until_tokens(samples: list[Sample], count: int) -> None:
    """Yield to the decode loop until every sample holds at least `count` tokens."""
    while min(len(s.response_ids) for s in samples) < count:
        await asyncio.sleep(0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
async def test_engine_logprobs_equal_reference_logprobs_for_the_same_weights(
    engine, tokenizer, temperature
):
    # Four prompts of different lengths, three samples each, decoded in one left-padded batch
    # with top-p/top-k on: filtering shapes sampling only, so every logprob is the reference's.
    assert isinstance(engine, RolloutEngine)
    samples = make_samples(tokenizer, PROMPTS, n=3, max_new_tokens=12)
    params = SamplingParams(temperature=temperature, top_p=0.9, top_k=20)
    assert await engine.generate(samples, params) is samples
    for s in samples:
        assert len(s.response_ids) == len(s.rollout_logprobs) == len(s.token_versions) > 0
        assert s.token_versions == [0] * len(s.response_ids)
    error = _max_logprob_error(engine.model, samples, tokenizer.pad_token_id, temperature)
    assert error <= TOLERANCE


async def test_samples_of_one_prompt_differ_and_greedy_is_the_deterministic_argmax(
    engine, tokenizer
):
    sampled = make_samples(tokenizer, ["sort:123="], n=6, max_new_tokens=10)
    await engine.generate(sampled, SamplingParams(temperature=1.0))
    assert len({tuple(s.response_ids) for s in sampled}) > 1
    # Greedy: the same tokens in one call and in the next, each the argmax of the reference
    # logits, with the logprob of the unscaled distribution.
    greedy = make_samples(tokenizer, ["sort:123="], n=3, max_new_tokens=10)
    await engine.generate(greedy, SamplingParams(temperature=0.0))
    again = make_samples(tokenizer, ["sort:123="], n=1, max_new_tokens=10)
    await engine.generate(again, SamplingParams(temperature=0.0))
    assert {tuple(s.response_ids) for s in greedy + again} == {tuple(greedy[0].response_ids)}
    batch, reference = _reference(engine.model, greedy[:1], tokenizer.pad_token_id)
    with torch.no_grad():
        logits = engine.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                              position_ids=position_ids_from_mask(batch.attention_mask)).logits[0]
    p = len(greedy[0].prompt_ids)
    for i, token in enumerate(greedy[0].response_ids):
        assert token == int(logits[p - 1 + i].argmax())
        assert abs(greedy[0].rollout_logprobs[i] - float(reference[0, p + i])) <= TOLERANCE
    # top_k = 1 samples the argmax too, but reports the unfiltered logprob at its temperature.
    top1 = make_samples(tokenizer, ["sort:123="], n=2, max_new_tokens=10)
    await engine.generate(top1, SamplingParams(temperature=0.7, top_k=1))
    assert all(s.response_ids == greedy[0].response_ids for s in top1)
    assert all(lp < 0 for lp in top1[0].rollout_logprobs)
    assert _max_logprob_error(engine.model, top1, tokenizer.pad_token_id, 0.7) <= TOLERANCE


async def test_max_new_tokens_bounds_every_response_and_a_spent_budget_returns_at_once(
    engine, tokenizer
):
    samples = make_samples(tokenizer, ["sort:1=", "ab"], n=3, max_new_tokens=5)
    await engine.generate(samples, SamplingParams(temperature=1.0))
    for s in samples:
        assert 0 < len(s.response_ids) <= 5
        stopped = s.response_ids[-1] == tokenizer.eos_token_id
        assert s.finish_reason is (FinishReason.STOP if stopped else FinishReason.LENGTH)
        assert stopped or len(s.response_ids) == 5
    # A resumed sample whose budget is spent comes back LENGTH, untouched.
    spent = make_samples(tokenizer, ["ab"], n=1, max_new_tokens=2)[0]
    spent.response_ids, spent.rollout_logprobs, spent.token_versions = [5, 6], [-1.0, -2.0], [0, 0]
    spent.finish_reason = FinishReason.ABORT
    await engine.generate([spent], SamplingParams())
    assert spent.finish_reason is FinishReason.LENGTH and spent.response_ids == [5, 6]


async def test_eos_token_ends_a_sample_and_is_kept_with_its_logprob(model_dir, tokenizer):
    # Greedy decoding is deterministic: name one of its tokens EOS and every copy stops there.
    plain = CpuEngine(str(model_dir))
    free = make_samples(tokenizer, ["sort:98765="], n=1, max_new_tokens=8)[0]
    await plain.generate([free], SamplingParams(temperature=0.0))
    await plain.close()
    tokens = free.response_ids
    k = tokens.index(tokens[-1])  # where the greedy answer first emits its last token
    stopping = CpuEngine(str(model_dir), eos_token_id=tokens[k])
    stopped = make_samples(tokenizer, ["sort:98765="], n=2, max_new_tokens=8)
    await stopping.generate(stopped, SamplingParams(temperature=0.0))
    await stopping.close()
    for s in stopped:
        assert s.finish_reason is FinishReason.STOP
        assert s.response_ids == tokens[: k + 1]
        assert s.rollout_logprobs == pytest.approx(free.rollout_logprobs[: k + 1], abs=1e-6)


async def test_weights_that_make_eos_likely_stop_samples_under_the_new_version(
    engine, model_dir, tokenizer
):
    # EOS's output-embedding row (tied to its input embedding) pushed far out: EOS is the argmax.
    eos_model = _load(model_dir)
    eos_id = tokenizer.eos_token_id
    with torch.no_grad():
        eos_model.lm_head.weight[eos_id] = 50 * eos_model.lm_head.weight[eos_id].sign()
    await engine.update_weights(eos_model.state_dict().items(), policy_version=1)
    assert engine.policy_version == 1
    stops = make_samples(tokenizer, ["sort:1="], n=2, max_new_tokens=5)
    await engine.generate(stops, SamplingParams(temperature=0.0))
    for s in stops:
        assert s.finish_reason is FinishReason.STOP
        assert s.response_ids[-1] == eos_id and s.token_versions[-1] == 1
    assert _max_logprob_error(eos_model, stops, tokenizer.pad_token_id) <= TOLERANCE


async def test_abort_returns_partials_that_resume_from_their_tokens(engine, tokenizer):
    samples = make_samples(tokenizer, ["sort:98765=", "ab"], n=2, max_new_tokens=60)
    params = SamplingParams(temperature=1.0)
    task = asyncio.create_task(engine.generate(samples, params))
    await _until_tokens(samples, 3)
    await engine.abort()
    await task
    partial = [s for s in samples if s.finish_reason is FinishReason.ABORT]
    assert partial, "an abort after three steps must leave unfinished samples"
    for s in partial:
        assert 3 <= len(s.response_ids) < 60
        assert len(s.response_ids) == len(s.rollout_logprobs) == len(s.token_versions)
    before = {s.sample_id: list(s.response_ids) for s in partial}
    await engine.generate(partial, params)  # resume: the same Sample objects go back in
    for s in partial:
        assert s.response_ids[: len(before[s.sample_id])] == before[s.sample_id]
        assert len(s.response_ids) > len(before[s.sample_id])
        assert s.finish_reason in (FinishReason.STOP, FinishReason.LENGTH)
    # Resumed tokens were predicted from the re-prefilled context: still the reference's.
    assert _max_logprob_error(engine.model, partial, tokenizer.pad_token_id) <= TOLERANCE


async def test_abort_by_id_stops_only_those_samples_and_is_not_remembered(engine, tokenizer):
    samples = make_samples(tokenizer, ["sort:98765="], n=3, max_new_tokens=15)
    task = asyncio.create_task(engine.generate(samples, SamplingParams(temperature=1.0)))
    await _until_tokens(samples, 2)
    await engine.abort([samples[0].sample_id, "not-in-flight"])
    await task
    assert samples[0].finish_reason is FinishReason.ABORT
    assert all(s.is_finished for s in samples[1:])
    # Ids are not kept: a later request with an id named in an earlier abort runs normally.
    late = make_samples(tokenizer, ["ab"], n=1, max_new_tokens=4)[0]
    late.sample_id = "not-in-flight"
    await engine.generate([late, samples[0]], SamplingParams(temperature=1.0))
    assert late.is_finished and samples[0].is_finished


async def test_weight_update_mid_generation_switches_version_and_logprobs(
    engine, model_dir, tokenizer
):
    old_model, new_model = _load(model_dir), _load(model_dir)
    with torch.no_grad():
        for p in new_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    samples = make_samples(tokenizer, ["sort:98765=", "12+34="], n=2, max_new_tokens=40)
    task = asyncio.create_task(engine.generate(samples, SamplingParams(temperature=1.0)))
    await _until_tokens(samples, 4)
    # The tied lm_head.weight left out: its embedding twin carries it.
    await engine.update_weights(
        [(n, t) for n, t in new_model.state_dict().items() if n != "lm_head.weight"], 7)
    await task
    for s in samples:
        assert s.token_versions == sorted(s.token_versions)  # non-decreasing
        assert s.token_versions[:4] == [0] * 4 and s.token_versions[-1] == 7
        # Each token's logprob belongs to the weights of its version.
        old_batch, old = _reference(old_model, [s], tokenizer.pad_token_id)
        _, new = _reference(new_model, [s], tokenizer.pad_token_id)
        p = len(s.prompt_ids)
        for i, version in enumerate(s.token_versions):
            expected = (new if version == 7 else old)[0, p + i]
            assert abs(float(expected) - s.rollout_logprobs[i]) <= TOLERANCE
    assert all(torch.equal(t, new_model.state_dict()[n]) for n, t in engine.state_dict().items())


async def test_bad_weight_updates_are_clear_errors_that_leave_the_policy_unchanged(
    engine, model_dir
):
    weights = dict(_load(model_dir).state_dict())
    before = engine.state_dict()
    unknown = [*((n, t + 1) for n, t in weights.items()), ("nope.weight", torch.zeros(1))]
    with pytest.raises(ValueError, match=r"no weight named \['nope.weight'\]"):
        await engine.update_weights(unknown, policy_version=1)
    missing = [(n, t) for n, t in weights.items() if n != "model.norm.weight"]
    with pytest.raises(ValueError, match=r"1 weights missing, e.g. \['model.norm.weight'\]"):
        await engine.update_weights(missing, policy_version=1)
    reshaped = {**weights, "model.norm.weight": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"'model.norm.weight' has shape \(3,\)"):
        await engine.update_weights(reshaped.items(), policy_version=1)
    assert engine.policy_version == 0
    assert all(torch.equal(t, before[n]) for n, t in engine.state_dict().items())


async def test_concurrent_requests_join_the_running_batch(engine, tokenizer):
    # One request starts decoding; four more arrive from other tasks while it runs. They must
    # share decode steps with it (one forward for many rows), and all match the reference.
    shapes: list[tuple[int, int]] = []
    hook = engine.model.register_forward_hook(
        lambda _m, _a, kwargs, _o: shapes.append(tuple(kwargs["input_ids"].shape)),
        with_kwargs=True)
    params = SamplingParams(temperature=1.0)
    first = make_samples(tokenizer, ["sort:98765="], n=2, max_new_tokens=30)
    running = asyncio.create_task(engine.generate(first, params))
    await _until_tokens(first, 2)
    later = [make_samples(tokenizer, [p], n=2, max_new_tokens=20) for p in PROMPTS]
    for i, group in enumerate(later):
        for s in group:
            s.sample_id = f"late{i}/{s.sample_id}"
    await asyncio.gather(running, *(engine.generate(g, params) for g in later))
    hook.remove()
    everything = first + [s for g in later for s in g]
    assert all(s.is_finished for s in everything)
    decode_steps = [b for b, t in shapes if t == 1]
    assert max(decode_steps) > len(first)  # later rows decoded beside the first ones
    assert len(decode_steps) < sum(len(s.response_ids) for s in everything) / 4
    assert _max_logprob_error(engine.model, everything, tokenizer.pad_token_id) <= TOLERANCE


async def test_rows_leaving_the_batch_do_not_change_the_logprobs_of_the_rest(engine, tokenizer):
    # The longest context finishes first (small budget), so the batch's left padding shrinks
    # under the rows that stay; their later tokens must still match the reference.
    short_lived = make_samples(tokenizer, ["sort:98765=12+34="], n=2, max_new_tokens=3)
    staying = make_samples(tokenizer, ["ab", "12+34="], n=2, max_new_tokens=25)
    samples = short_lived + staying
    await engine.generate(samples, SamplingParams(temperature=1.0))
    assert all(len(s.response_ids) <= 3 for s in short_lived)
    assert max(len(s.response_ids) for s in staying) > 3
    assert _max_logprob_error(engine.model, samples, tokenizer.pad_token_id) <= TOLERANCE


async def test_max_batch_size_caps_the_rows_decoded_together(model_dir, tokenizer):
    engine = CpuEngine(str(model_dir), max_batch_size=2)
    rows: list[int] = []
    engine.model.register_forward_hook(
        lambda _m, _a, kwargs, _o: rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    samples = make_samples(tokenizer, PROMPTS, n=2, max_new_tokens=6)
    await engine.generate(samples, SamplingParams(temperature=1.0))
    await engine.close()
    assert all(s.is_finished for s in samples) and max(rows) == 2
    assert _max_logprob_error(engine.model, samples, tokenizer.pad_token_id) <= TOLERANCE


async def test_a_cancelled_generate_call_stops_decoding_its_samples(engine, tokenizer):
    # The caller gives up (e.g. a timeout): its rows leave the batch; another call goes on.
    params = SamplingParams(temperature=1.0)
    dropped = make_samples(tokenizer, ["sort:98765="], n=2, max_new_tokens=60)
    kept = make_samples(tokenizer, ["ab"], n=2, max_new_tokens=20)
    for s in kept:
        s.sample_id = f"kept-{s.sample_id}"
    cancelled = asyncio.create_task(engine.generate(dropped, params))
    running = asyncio.create_task(engine.generate(kept, params))
    await _until_tokens(dropped, 2)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    lengths = [len(s.response_ids) for s in dropped]
    await running
    assert all(s.finish_reason is FinishReason.ABORT for s in dropped)
    assert [len(s.response_ids) for s in dropped] == lengths  # no token after the cancel
    assert all(s.is_finished for s in kept)


async def test_close_returns_in_flight_samples_as_partials(model_dir, tokenizer):
    engine = CpuEngine(str(model_dir))
    samples = make_samples(tokenizer, ["sort:98765="], n=2, max_new_tokens=60)
    task = asyncio.create_task(engine.generate(samples, SamplingParams(temperature=1.0)))
    await _until_tokens(samples, 2)
    await engine.close()
    assert all(s.finish_reason is FinishReason.ABORT for s in await task)
    with pytest.raises(RuntimeError, match="closed"):
        await engine.generate(samples, SamplingParams())


async def test_engine_logprobs_equal_the_torch_trainers_recomputed_logprobs(
    engine, model_dir, tokenizer
):
    from asyncrl.config.job import AlgorithmConfig, TrainerConfig
    from asyncrl.train.torch_backend import TorchBackend

    samples = make_samples(tokenizer, PROMPTS, n=2, max_new_tokens=12)
    await engine.generate(samples, SamplingParams(temperature=0.8))
    trainer = TorchBackend(str(model_dir), AlgorithmConfig(), TrainerConfig(micro_batch_size=3),
                           temperature=0.8, max_new_tokens=12, total_steps=1, seed=0)
    batch = as_batch(samples, tokenizer.pad_token_id)
    recomputed = trainer.logprobs(batch)
    error = ((recomputed - batch.rollout_logprobs).abs() * batch.loss_mask).max()
    assert float(error) <= TOLERANCE


async def test_sampling_depends_only_on_seed_sample_and_position_not_on_batching(
    model_dir, tokenizer
):
    # Same samples, once all together and once one by one in reverse order, with an abort and
    # resume in between: every sample gets the same tokens (the run repeats whatever the timing).
    together = make_samples(tokenizer, PROMPTS, n=3, max_new_tokens=12)
    engine = CpuEngine(str(model_dir), seed=7)
    await engine.generate(together, SamplingParams(temperature=1.0))
    await engine.close()

    apart = make_samples(tokenizer, PROMPTS, n=3, max_new_tokens=12)
    engine = CpuEngine(str(model_dir), seed=7)
    first = asyncio.create_task(engine.generate(apart[:1], SamplingParams(temperature=1.0)))
    await _until_tokens(apart[:1], 3)
    await engine.abort([apart[0].sample_id])
    await first
    for sample in reversed(apart):
        await engine.generate([sample], SamplingParams(temperature=1.0))
    await engine.close()
    assert [s.response_ids for s in apart] == [s.response_ids for s in together]

    engine = CpuEngine(str(model_dir), seed=8)  # another seed draws other tokens
    other = make_samples(tokenizer, PROMPTS, n=3, max_new_tokens=12)
    await engine.generate(other, SamplingParams(temperature=1.0))
    await engine.close()
    assert [s.response_ids for s in other] != [s.response_ids for s in together]


async def test_first_tokens_follow_the_models_distribution(engine, model_dir, tokenizer):
    # 4000 samples of one prompt: the empirical first-token frequencies match softmax(logits)
    # within 4 standard errors (inverse-CDF sampling is exact, filtered or not).
    samples = make_samples(tokenizer, ["sort:4213="], n=4000, max_new_tokens=1)
    await engine.generate(samples, SamplingParams(temperature=1.0))
    counts = torch.bincount(torch.tensor([s.response_ids[0] for s in samples]),
                            minlength=len(tokenizer)).double()
    ids = torch.tensor([samples[0].prompt_ids])
    with torch.no_grad():
        probs = torch.softmax(_load(model_dir)(input_ids=ids).logits[0, -1].double(), -1)
    probs = probs[: len(counts)]
    stderr = (probs * (1 - probs) / 4000).sqrt()
    assert ((counts / 4000 - probs).abs() <= 4 * stderr + 1e-3).all()


async def test_min_new_tokens_holds_off_eos_until_the_floor(engine, model_dir, tokenizer):
    # EOS made the argmax everywhere: without a floor a sample stops at once; with
    # min_new_tokens=4 it stops exactly at token 5 (EOS sampled as soon as it is allowed).
    eos_model = _load(model_dir)
    eos_id = tokenizer.eos_token_id
    with torch.no_grad():
        eos_model.lm_head.weight[eos_id] = 50 * eos_model.lm_head.weight[eos_id].sign()
    await engine.update_weights(eos_model.state_dict().items(), policy_version=1)
    free, floored = make_samples(tokenizer, ["sort:1=", "sort:2="], n=1, max_new_tokens=8)
    floored.min_new_tokens = 4
    await engine.generate([free, floored], SamplingParams(temperature=1.0))
    assert free.response_ids == [eos_id]
    assert len(floored.response_ids) == 5 and floored.response_ids[-1] == eos_id
    assert eos_id not in floored.response_ids[:4]
    assert floored.finish_reason is FinishReason.STOP
