"""The episode loop: model turn, environment turn, ... until done or a budget is spent.

A model turn is one engine `generate` of the sample with its budget capped at the turn's end
(`turn_start + max_turn_tokens`): it ends at EOS (kept, and trained: it is the model's
end-of-turn) or at that cap. The workflow then reads the turn's decoded text and answers with an
observation, tokenised and appended with mask False, or says done.

Budgets: `Sample.max_new_tokens` counts model and environment tokens together (the context
grows with both); an observation that does not fit is cut, and the episode ends LENGTH.

Ends (`episode["end"]`): "done" (the workflow said so) and "max_turns" finish STOP;
"max_new_tokens" finishes LENGTH; "error" (the workflow's step raised, `episode["error"]`
says what) finishes STOP, and the sample's reward then fails with reason "workflow" (its
group is dropped as reward_failed, or scored by reward.on_failure) instead of the run.
The environment steps on every model turn, also the last, but an observation is appended only
when another model turn follows it.

Abort/resume: `episode["turn_start"]` is where the current (or next) model turn starts and
`episode["turns"]` how many are done, so an episode interrupted mid-turn (the engine returns it
ABORT) resumes that turn from its tokens; one interrupted between turns (`aborted()` true)
comes back ABORT with its observation already appended and resumes with the next model turn.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable

from asyncrl.rollout.workflow import Step, Workflow, WorkflowSpec
from asyncrl.types import FinishReason, Sample


async def run_episode(
    sample: Sample,
    *,
    generate: Callable[[Sample], Awaitable[None]],
    decode: Callable[[list[int]], str],
    encode: Callable[[str], list[int]],
    workflow: Workflow,
    spec: WorkflowSpec,
    aborted: Callable[[], bool],
) -> Sample:
    """Run (or resume) `sample`'s episode until it finishes or is aborted.

    Args:
        generate: continues the sample until EOS, its `max_new_tokens` or an abort.
        decode / encode: the worker's tokenizer, text of token ids and ids of text.
        aborted: true once the worker was asked to abort this sample.
    """
    episode = sample.episode
    total = sample.max_new_tokens
    while True:
        if aborted():
            sample.finish_reason = FinishReason.ABORT
            return sample
        start = episode["turn_start"]
        cap = total if spec.max_turn_tokens is None else start + spec.max_turn_tokens
        sample.max_new_tokens, sample.finish_reason = min(total, cap), None
        try:
            await generate(sample)
        finally:
            sample.max_new_tokens = total
        if sample.finish_reason is FinishReason.ABORT:
            return sample  # resumed mid-turn later: turn_start still marks this turn
        episode["turns"] += 1
        try:
            step = workflow.step(decode(sample.response_ids[start:]), episode["state"])
            if inspect.isawaitable(step):
                step = await step
            if not isinstance(step, Step):
                raise TypeError(f"step() returned {type(step).__name__}, not a Step "
                                "(asyncrl.rollout.workflow.Step)")
        except Exception as exc:  # user code: this episode fails (its reward too), not the run
            episode["error"] = f"{type(exc).__name__}: {exc}"
            return _end(sample, "error", FinishReason.STOP)
        if step.done:
            return _end(sample, "done", FinishReason.STOP)
        if episode["turns"] >= spec.max_turns:
            return _end(sample, "max_turns", FinishReason.STOP)
        if sample.remaining_tokens <= 0:
            return _end(sample, "max_new_tokens", FinishReason.LENGTH)
        observation = encode(step.observation)
        sample.append_environment(observation[: sample.remaining_tokens])
        episode["turn_start"] = len(sample.response_ids)
        if sample.remaining_tokens <= 0:  # no room left for another model turn
            return _end(sample, "max_new_tokens", FinishReason.LENGTH)


def _end(sample: Sample, why: str, reason: FinishReason) -> Sample:
    sample.episode["end"] = why
    sample.finish_reason = reason
    return sample
