"""The data that moves between components: prompts, samples, groups, train batches.

Plain dataclasses (no Ray, no engine imports). Every generated token carries the policy version
that produced it (`token_versions`), so a sample continued after a weight update stays honest.

Token alignment in `TrainBatch` (all tensors `[B, T]`): row b holds prompt + response tokens,
right-padded. Position t of a per-token tensor (logprobs, loss_mask, ...) describes token t as
predicted from tokens `< t`; position 0 is never a response token, so it is always masked.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import torch


class FinishReason(StrEnum):
    STOP = "stop"  # the engine produced EOS (or a stop token)
    LENGTH = "length"  # max_new_tokens reached
    ABORT = "abort"  # interrupted; a partial that may be resumed


class DropReason(StrEnum):
    """Why a sample was not trained; each is a metric label."""

    STALE = "stale"  # its group grew older than η while waiting
    STALE_PARTIAL = "stale_partial"  # an interrupted answer that could never be trained in time
    ALL_EQUAL_REWARD = "all_equal_reward"  # dynamic sampling: the group carries no signal
    REWARD_FAILED = "reward_failed"  # some reward in the group failed (never scored as 0)


class RewardStatus(StrEnum):
    OK = "ok"
    FAILED = "failed"
    TIMEOUT = "timeout"


@dataclass(slots=True, frozen=True)
class Reward:
    """A reward result. A failure is a status with a reason, never a silent 0."""

    value: float
    status: RewardStatus = RewardStatus.OK
    error: str | None = None
    correct: bool | None = None  # task accuracy where the reward knows it (None: does not apply)

    @classmethod
    def failed(cls, error: str, status: RewardStatus = RewardStatus.FAILED) -> Reward:
        return cls(value=math.nan, status=status, error=error)

    @property
    def ok(self) -> bool:
        return self.status is RewardStatus.OK


@dataclass(slots=True, frozen=True)
class SamplingParams:
    """How an engine samples. Logprobs are always of softmax(logits / temperature), unfiltered."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: disabled


@dataclass(slots=True)
class Prompt:
    """One task instance. `answer` and `metadata` go to the reward function untouched."""

    prompt_id: str
    text: str
    input_ids: list[int]
    answer: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    attempt: int = 0  # times its group was dropped as stale and the prompt re-queued


@dataclass(slots=True)
class Sample:
    """One answer to one prompt; may be partial (finish_reason ABORT) and resumed later.

    `rollout_logprobs[i]` and `token_versions[i]` describe `response_ids[i]`: the behaviour
    policy's log-probability of that token and the policy version that sampled it.

    Multi-turn episodes (asyncrl.rollout.workflow) interleave environment tokens (tool output,
    observations) with the model's. `response_mask[i]` is False for such a token; positions at
    or past `len(response_mask)` are model tokens, so an empty mask means "all model tokens"
    and engines, which only append model tokens, never touch it. An environment token has
    logprob 0 and the version of the model token before it, so the oldest version (staleness)
    is always a model token's. `episode` is the workflow's state (turns, the environment's own
    state); empty for a single-turn sample. It lives on the sample so a partial, or a
    checkpoint (which pickles samples), resumes the episode where it stopped.
    """

    sample_id: str
    prompt_id: str
    prompt_ids: list[int]
    max_new_tokens: int
    response_ids: list[int] = field(default_factory=list)
    rollout_logprobs: list[float] = field(default_factory=list)
    token_versions: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    reward: Reward | None = None
    response_text: str = ""
    min_new_tokens: int = 0  # EOS is not sampled before this many tokens (forced lengths)
    response_mask: list[bool] = field(default_factory=list)  # see the class docstring
    episode: dict[str, Any] = field(default_factory=dict)

    @property
    def is_finished(self) -> bool:
        return self.finish_reason in (FinishReason.STOP, FinishReason.LENGTH)

    @property
    def remaining_tokens(self) -> int:
        return self.max_new_tokens - len(self.response_ids)

    @property
    def oldest_version(self) -> int | None:
        return min(self.token_versions) if self.token_versions else None

    def append(self, token_id: int, logprob: float, version: int) -> None:
        self.response_ids.append(token_id)
        self.rollout_logprobs.append(logprob)
        self.token_versions.append(version)

    def append_environment(self, token_ids: list[int]) -> None:
        """Append environment tokens (never trained): logprob 0, the last token's version."""
        if not token_ids:
            return
        if not self.response_ids:
            raise ValueError(f"sample {self.sample_id!r}: an episode starts with a model turn")
        self.response_mask += [True] * (len(self.response_ids) - len(self.response_mask))
        version = self.token_versions[-1]
        for token_id in token_ids:
            self.response_ids.append(token_id)
            self.rollout_logprobs.append(0.0)
            self.token_versions.append(version)
            self.response_mask.append(False)

    def model_token_mask(self) -> list[bool]:
        """One bool per response token: True for a model token (trained)."""
        return self.response_mask + [True] * (len(self.response_ids) - len(self.response_mask))


def new_episode(state: dict[str, Any]) -> dict[str, Any]:
    """`Sample.episode` of a fresh sample: no turn done, the next model turn starts at 0; the
    environment's initial state is kept (`initial`) so the episode can be started over."""
    return {"turns": 0, "turn_start": 0, "state": state, "initial": copy.deepcopy(state)}


def restart_episode(episode: dict[str, Any]) -> dict[str, Any]:
    """The episode of a sample that replaces one (a stale partial): from its first turn again;
    {} for a single-turn sample."""
    return new_episode(copy.deepcopy(episode["initial"])) if episode else {}


@dataclass(slots=True)
class Group:
    """The samples of one prompt; GRPO-style advantages need the whole group."""

    prompt: Prompt
    samples: list[Sample]

    @property
    def rewards(self) -> list[float]:
        return [s.reward.value if s.reward is not None else math.nan for s in self.samples]


@dataclass(slots=True)
class TrainBatch:
    """Padded tensors for one optimizer step; see the module docstring for the alignment.

    Attributes:
        input_ids: [B, T] int64, prompt + response, right-padded.
        attention_mask: [B, T] bool, True for real tokens.
        loss_mask: [B, T] bool, True for response tokens that are trained (model tokens; an
            episode's environment tokens are False).
        rollout_logprobs: [B, T] float32, behaviour-policy logprobs (0 where not a response token).
        token_versions: [B, T] int64, policy version per token (-1 where not a response token).
        rewards: [B] float32, one scalar reward per sample.
        group_ids: [B] int64, samples with the same id belong to the same prompt's group.
        expert_rows: [B] bool, True for off-policy expert samples (asyncrl.algo.expert), which
            have no behaviour logprobs and are trained by the SFT term only; None: none.
        expert_coef: μ, the weight of the expert term this step.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    rollout_logprobs: torch.Tensor
    token_versions: torch.Tensor
    rewards: torch.Tensor
    group_ids: torch.Tensor
    sample_ids: list[str] = field(default_factory=list)
    expert_rows: torch.Tensor | None = None
    expert_coef: float = 0.0

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])

    @classmethod
    def from_groups(cls, groups: list[Group], pad_token_id: int, *,
                    expert: list[Sample] = (), expert_coef: float = 0.0) -> TrainBatch:
        """Pack scored, finished groups into right-padded [B, T] tensors. An `expert` sample
        follows its prompt's group (so minibatch splits spread them) as a group of its own
        with reward 0: no advantage reaches it."""
        by_prompt = {s.prompt_id: s for s in expert}
        samples, is_expert = [], []
        for gi, g in enumerate(groups):
            samples += [(gi, s) for s in g.samples]
            is_expert += [False] * len(g.samples)
            if g.prompt.prompt_id in by_prompt:
                samples.append((len(groups) + len(samples), by_prompt[g.prompt.prompt_id]))
                is_expert.append(True)
        width = max(len(s.prompt_ids) + len(s.response_ids) for _, s in samples)
        b = len(samples)
        input_ids = torch.full((b, width), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((b, width), dtype=torch.bool)
        loss_mask = torch.zeros((b, width), dtype=torch.bool)
        rollout_logprobs = torch.zeros((b, width), dtype=torch.float32)
        token_versions = torch.full((b, width), -1, dtype=torch.long)
        rewards = torch.empty(b, dtype=torch.float32)
        group_ids = torch.empty(b, dtype=torch.long)
        for row, (gi, s) in enumerate(samples):
            p, r = len(s.prompt_ids), len(s.response_ids)
            input_ids[row, : p + r] = torch.tensor(s.prompt_ids + s.response_ids)
            attention_mask[row, : p + r] = True
            loss_mask[row, p : p + r] = torch.tensor(s.model_token_mask(), dtype=torch.bool)
            rollout_logprobs[row, p : p + r] = torch.tensor(s.rollout_logprobs)
            token_versions[row, p : p + r] = torch.tensor(s.token_versions)
            rewards[row] = s.reward.value if s.reward is not None else math.nan
            group_ids[row] = gi
        expert_rows = None
        if any(is_expert):
            expert_rows = torch.tensor(is_expert)
            rewards[expert_rows] = 0.0
        return cls(
            input_ids=input_ids,
            attention_mask=attention_mask,
            loss_mask=loss_mask,
            rollout_logprobs=rollout_logprobs,
            token_versions=token_versions,
            rewards=rewards,
            group_ids=group_ids,
            sample_ids=[s.sample_id for _, s in samples],
            expert_rows=expert_rows,
            expert_coef=expert_coef,
        )

    def take(self, rows: torch.Tensor) -> TrainBatch:
        """The given rows ([R] int64), trimmed to the longest sequence among them."""
        width = int(self.attention_mask[rows].sum(1).max())
        return TrainBatch(
            input_ids=self.input_ids[rows, :width],
            attention_mask=self.attention_mask[rows, :width],
            loss_mask=self.loss_mask[rows, :width],
            rollout_logprobs=self.rollout_logprobs[rows, :width],
            token_versions=self.token_versions[rows, :width],
            rewards=self.rewards[rows],
            group_ids=self.group_ids[rows],
            sample_ids=[self.sample_ids[i] for i in rows.tolist()],
            expert_rows=None if self.expert_rows is None else self.expert_rows[rows],
            expert_coef=self.expert_coef,
        )
