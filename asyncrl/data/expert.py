"""Expert samples (CHORD, asyncrl.algo.expert): a prompt's expert response as a Sample the
trainer's SFT term trains. Not generated, so it has no behaviour logprobs and no policy version;
it is not in the DataManager's ledger (which accounts for generated samples)."""

from __future__ import annotations

from typing import Any

from asyncrl.types import FinishReason, Prompt, Sample


def expert_text(prompt: Prompt, field: str) -> str | None:
    """The expert response of `prompt`: its reference answer, or a metadata (JSONL) field."""
    text = prompt.answer if field == "answer" else prompt.metadata.get(field)
    return str(text) if text not in (None, "") else None


def expert_sample(prompt: Prompt, field: str, tokenizer: Any, max_new_tokens: int
                  ) -> Sample | None:
    """The expert response tokenised and ended with EOS (cut at max_new_tokens, like a
    generated answer); None when the prompt has none."""
    text = expert_text(prompt, field)
    if text is None:
        return None
    ids = tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    ids = ids[:max_new_tokens]
    return Sample(
        sample_id=f"{prompt.prompt_id}/expert", prompt_id=prompt.prompt_id,
        prompt_ids=list(prompt.input_ids), max_new_tokens=max_new_tokens, response_ids=ids,
        rollout_logprobs=[0.0] * len(ids), token_versions=[-1] * len(ids),
        finish_reason=FinishReason.STOP, response_text=text,
    )
