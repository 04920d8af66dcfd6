"""Per-prompt pass-rate statistics and the two data-side rules built on them (pure: no Ray).

    scored group ──record──► PromptStats[prompt_key] ──► plan(prompt, version)
                                                          ├─ skip (too_easy / too_hard)
                                                          └─ n samples for its group

- **Difficulty filter** (DAPO-style filtering moved *before* generation, as in Prompt
  Curriculum Learning, but with recorded statistics instead of PCL's learned value model): a
  prompt whose recorded pass rate is below `low` or above `high` is skipped at draw time, so
  no rollout is spent on it. A prompt with fewer than `min_samples` recorded answers is always
  generated. A prompt skipped `max_skips` times in a row is generated again, so its pass rate
  follows the policy and a dataset the filter rejects entirely cannot stall the run.
- **Variable samples per prompt**: `pass_rate` gives a known prompt
  round(n_min + (n_max − n_min)·(1 − pass rate)) samples (more for hard prompts, as BroRL and
  DRIVE's hard-focus retention do; unknown prompts get the default n); `two_stage` gives every
  prompt `stage2_n` samples from policy version `stage2_version` on (DRIVE: 8, then 64).

A prompt's key is its text and answer (`prompt_key`), not its prompt_id: ids are unique per
draw, while a dataset repeats the same example across epochs. The pass rate of an answer is
`Reward.correct` where the reward knows it, else its value (the same thing for 0/1 rewards).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Literal

from asyncrl.types import Prompt, Reward

TOO_EASY, TOO_HARD = "too_easy", "too_hard"  # skip reasons (prompt fates `skipped:REASON`)


def prompt_key(prompt: Prompt) -> str:
    """Stable across draws and epochs: the same question with the same answer is one key."""
    digest = hashlib.sha1(f"{prompt.text}\0{prompt.answer}".encode())
    return digest.hexdigest()[:16]


def success(reward: Reward) -> float:
    """An answer's contribution to its prompt's pass rate."""
    return float(reward.correct) if reward.correct is not None else reward.value


@dataclass(slots=True)
class PromptRecord:
    samples: int = 0  # answers with an ok reward recorded
    successes: float = 0.0  # Σ success(reward)
    groups: int = 0  # scored groups recorded
    last_version: int = -1  # policy version of the newest recorded group
    skips: int = 0  # skipped in a row since the last recorded group

    @property
    def pass_rate(self) -> float:
        return self.successes / self.samples


@dataclass(frozen=True, slots=True)
class FilterRule:
    low: float
    high: float
    min_samples: int
    max_skips: int

    def skip_reason(self, record: PromptRecord | None) -> str | None:
        """Why to skip a prompt with this record, or None to generate it."""
        if record is None or record.samples < self.min_samples or record.skips >= self.max_skips:
            return None
        if record.pass_rate < self.low:
            return TOO_HARD
        if record.pass_rate > self.high:
            return TOO_EASY
        return None


@dataclass(frozen=True, slots=True)
class SampleRule:
    mode: Literal["pass_rate", "two_stage"]
    n_min: int = 2
    n_max: int = 2
    stage2_version: int = 0
    stage2_n: int = 2

    def group_size(self, record: PromptRecord | None, version: int, default: int) -> int:
        if self.mode == "two_stage":
            return self.stage2_n if version >= self.stage2_version else default
        if record is None or not record.samples:
            return default
        return round(self.n_min + (self.n_max - self.n_min) * (1.0 - record.pass_rate))


@dataclass(frozen=True, slots=True)
class Plan:
    """A drawn prompt's plan: its group size, or the reason it is skipped (then n is 0)."""

    n: int
    skip: str | None = None


@dataclass
class Curriculum:
    """The statistics and the rules that read them; `None` rules are off."""

    default_n: int
    filter: FilterRule | None = None
    samples: SampleRule | None = None
    stats: dict[str, PromptRecord] = field(default_factory=dict)

    def plan(self, prompt: Prompt, version: int) -> Plan:
        """A re-queued prompt (attempt > 0) was admitted already: it is never skipped."""
        record = self.stats.get(prompt_key(prompt))
        reason = self.filter.skip_reason(record) if self.filter and not prompt.attempt else None
        if reason is not None:
            record.skips += 1
            return Plan(0, reason)
        if self.samples is None:
            return Plan(self.default_n)
        return Plan(self.samples.group_size(record, version, self.default_n))

    def record(self, prompt: Prompt, rewards: list[Reward], version: int) -> None:
        """One scored group (failed rewards are not evidence of difficulty: left out)."""
        ok = [r for r in rewards if r.ok]
        if not ok:
            return
        record = self.stats.setdefault(prompt_key(prompt), PromptRecord())
        record.samples += len(ok)
        record.successes += sum(success(r) for r in ok)
        record.groups += 1
        record.last_version = max(record.last_version, version)
        record.skips = 0

    def summary(self) -> dict[str, float]:
        """Metrics: prompts with statistics and their mean pass rate."""
        rates = [r.pass_rate for r in self.stats.values() if r.samples]
        return {"curriculum/prompts_known": float(len(self.stats)),
                "curriculum/mean_pass_rate": sum(rates) / len(rates) if rates else 0.0}

    def state_dict(self) -> dict:
        return {key: (r.samples, r.successes, r.groups, r.last_version, r.skips)
                for key, r in self.stats.items()}

    def load_state_dict(self, state: dict) -> None:
        self.stats = {key: PromptRecord(*values) for key, values in state.items()}
