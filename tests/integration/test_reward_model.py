"""The reward-model reward with a real (tiny, randomly initialised) HF sequence classifier saved
from a config: batched scores equal one-by-one scores, and load errors are failures."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForSequenceClassification

from asyncrl.models.tiny import build_char_tokenizer
from asyncrl.reward import build_reward
from asyncrl.types import Prompt

PROMPTS = ["sort:31415=", "12+7=", "sort:9=", "what:is(1+2)*3?"]
RESPONSES = ["11345", "19", "9999999999", ""]


def _save_classifier(path, num_labels: int = 1):
    tokenizer = build_char_tokenizer()
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, num_labels=num_labels)
    torch.manual_seed(0)
    Qwen2ForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _prompts():
    return [Prompt(prompt_id=f"p{i}", text=t, input_ids=[]) for i, t in enumerate(PROMPTS)]


async def test_batched_scores_equal_one_by_one_scores(tmp_path):
    reward = build_reward("reward_model", None, {"path": _save_classifier(tmp_path),
                                                 "batch_size": 3})
    prompts = _prompts()
    batched = await reward.score_batch(prompts, RESPONSES)  # chunks of 3 and 1, padded
    single = [await reward.score(p, r) for p, r in zip(prompts, RESPONSES, strict=True)]
    assert all(r.ok and r.correct is None for r in batched + single)
    assert [r.value for r in batched] == pytest.approx([r.value for r in single], abs=1e-5)
    assert len({round(r.value, 4) for r in batched}) == len(PROMPTS)  # texts score differently
    # the template decides the text: prompt and response swapped score differently
    swapped = build_reward("reward_model", None, {"path": str(tmp_path),
                                                  "template": "{response}{prompt}"})
    other = await swapped.score(prompts[0], RESPONSES[0])
    assert other.value != pytest.approx(single[0].value, abs=1e-4)
    await reward.close()


async def test_a_label_the_model_lacks_fails_every_sample(tmp_path):
    reward = build_reward("reward_model", None, {"path": _save_classifier(tmp_path), "label": 1})
    rewards = await reward.score_batch(_prompts(), RESPONSES)
    assert all(not r.ok and r.error.startswith("error: reward model") for r in rewards)
    two = build_reward("reward_model", None, {"path": _save_classifier(tmp_path / "two", 2),
                                              "label": 1})
    assert (await two.score(_prompts()[0], "1")).ok
