"""GroupBuffer: the pure state machine behind the DataManager (no Ray, no asyncio).

Life of a sample (the ledger counts every one of them exactly once at any time):

    started ──► in flight ──► finished ──► in a complete group ──► ready ──► trained
                   │  ▲                        │                     │
                   ▼  │ resumed first          ▼ dropped: filter     ▼ dropped: stale
                 partial pool                 (reward_failed, all_equal_reward)
                   │
                   ▼ dropped: stale_partial (replaced by a fresh sample of the same prompt)

`started == trained + Σ dropped[reason] + pending` always holds (`ledger()` checks it). Every
sample id also has its own fate (`fates`: pending, trained@VERSION or dropped:REASON); an id
that would be started twice, or given a second final fate, is counted under `duplicates`.
Every prompt has a fate too (`prompt_fates`): trained@VERSION once one of its groups was
trained, pending while a sample or a re-queued attempt is still in play, else the reason its
last attempt was dropped; a prompt trained twice is counted under `duplicates` as well.
A prompt the curriculum (asyncrl.data.curriculum) skips at draw time starts no sample: its fate
is `skipped:too_easy` or `skipped:too_hard`: every prompt the DataManager planned is either
started or skipped (`prompts_started + prompts_skipped` of them).

Groups may differ in size (the curriculum's variable samples per prompt): each group keeps the
size it was started with, and is complete when that many of its samples are finished.

Staleness (asyncrl.algo.staleness) of a group = trainer version − oldest token version in it.
A ready group older than η when a batch is taken is dropped (reason "stale") and its prompt is
re-queued, so no prompt is lost. A partial whose oldest token is already older than η can never
be trained; it is dropped (reason "stale_partial") and a fresh sample takes its place.
"""

from __future__ import annotations

import itertools
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field, replace

from asyncrl.algo.staleness import staleness
from asyncrl.data.curriculum import Curriculum
from asyncrl.types import DropReason, FinishReason, Group, Prompt, Sample, restart_episode


@dataclass
class _GroupState:
    prompt: Prompt
    size: int
    finished: dict[str, Sample] = field(default_factory=dict)


@dataclass(frozen=True)
class Decision:
    """Whether a complete group is kept, and if not, the reason (a metric label)."""

    keep: bool
    reason: str = ""


def filter_group(group: Group, *, drop_all_equal: bool) -> Decision:
    if any(s.reward is None or not s.reward.ok for s in group.samples):
        return Decision(False, DropReason.REWARD_FAILED)
    if drop_all_equal and len({s.reward.value for s in group.samples}) == 1:
        return Decision(False, DropReason.ALL_EQUAL_REWARD)
    return Decision(True)


def _fate_kind(fate: str) -> str:
    """trained@3 → trained, dropped:stale → dropped, pending → pending."""
    return fate.partition("@")[0].partition(":")[0]


def group_staleness(group: Group, trainer_version: int) -> int:
    versions = [v for s in group.samples for v in s.token_versions]
    return staleness(versions, trainer_version)


class GroupBuffer:
    def __init__(
        self, *, group_size: int, max_staleness: int, drop_all_equal: bool,
        curriculum: Curriculum | None = None,
    ) -> None:
        self.group_size, self.max_staleness = group_size, max_staleness
        self.drop_all_equal = drop_all_equal
        self.curriculum = curriculum  # None: every prompt drawn gets group_size samples
        self._groups: dict[str, _GroupState] = {}  # prompt_id → open group (not yet ready)
        self._partials: OrderedDict[str, Sample] = OrderedDict()  # sample_id → partial
        self._ready: deque[Group] = deque()
        self._requeued: deque[Prompt] = deque()
        self._training = 0  # groups popped for a batch whose new weights are not yet out
        self._in_flight: dict[str, Sample] = {}  # as dispatched, for checkpoints
        self._fresh_ids = itertools.count()
        self.started = 0
        self.trained = 0
        self.resumed = 0  # partials continued from their tokens (not part of the balance)
        self.dropped: dict[str, int] = {}
        self.fates: dict[str, str] = {}  # sample_id → pending | trained@V | dropped:REASON
        self._samples_of: dict[str, list[str]] = {}  # prompt_id → every sample id it started
        # prompt_id → its fate, kept as events happen (not recounted: stats() runs every step)
        self._prompt_fates: dict[str, str] = {}
        self._prompt_kinds: Counter[str] = Counter()  # trained | pending | dropped | skipped
        self._finished_prompts: list[str] = []  # dropped for good since take_finished_prompts
        self.duplicates = 0

    # --- intake -------------------------------------------------------------------------
    def plan(self, prompts: list[Prompt], trainer_version: int) -> dict[str, int]:
        """Group sizes of the drawn prompts to start; a prompt left out is skipped (its fate
        is recorded here, so it is accounted although it starts no sample)."""
        if self.curriculum is None:
            return {p.prompt_id: self.group_size for p in prompts}
        sizes = {}
        for prompt in prompts:
            plan = self.curriculum.plan(prompt, trainer_version)
            if plan.skip is None:
                sizes[prompt.prompt_id] = plan.n
            else:
                self._set_prompt_fate(prompt.prompt_id, f"skipped:{plan.skip}")
        return sizes

    def start_group(self, prompt: Prompt, samples: list[Sample]) -> None:
        """A new group was dispatched (its samples are now in flight)."""
        self._groups[prompt.prompt_id] = _GroupState(prompt, len(samples))
        if not self._prompt_fates.get(prompt.prompt_id, "").startswith("trained@"):
            self._set_prompt_fate(prompt.prompt_id, "pending")  # also a re-queued retry's
        # (a trained prompt started again stays trained: training it twice is a duplicate)
        self.started += len(samples)
        self._in_flight.update((s.sample_id, s) for s in samples)
        for s in samples:
            self._begin(s)

    def resume(self, samples: list[Sample]) -> None:
        """Partials taken from the pool were dispatched again."""
        self._in_flight.update((s.sample_id, s) for s in samples)

    def add(self, samples: list[Sample]) -> None:
        """Samples came back from an engine: finished ones scored, aborted ones partial."""
        for s in samples:
            self._in_flight.pop(s.sample_id, None)
            if s.finish_reason is FinishReason.ABORT:
                self._partials[s.sample_id] = s
                continue
            state = self._groups[s.prompt_id]
            state.finished[s.sample_id] = s
            if len(state.finished) == state.size:
                self._complete(self._groups.pop(s.prompt_id))

    def requeue_lost(self, samples: list[Sample]) -> None:
        """Samples whose worker died: back to the pool, resumed like partials (nothing lost)."""
        for s in samples:
            self._in_flight.pop(s.sample_id, None)
            self._partials[s.sample_id] = s

    def _complete(self, state: _GroupState) -> None:
        group = Group(state.prompt, list(state.finished.values()))
        if self.curriculum is not None:  # every scored group, kept or dropped, is evidence
            newest = max((v for s in group.samples for v in s.token_versions), default=0)
            self.curriculum.record(group.prompt, [s.reward for s in group.samples
                                                  if s.reward is not None], newest)
        decision = filter_group(group, drop_all_equal=self.drop_all_equal)
        if decision.keep:
            self._ready.append(group)
        else:
            self._drop(group.samples, decision.reason)
            self._set_prompt_fate(group.prompt.prompt_id, f"dropped:{decision.reason}")
            self._finished_prompts.append(group.prompt.prompt_id)  # filtered: not re-queued

    def _drop(self, samples: list[Sample], reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + len(samples)
        for s in samples:
            self._settle(s.sample_id, f"dropped:{reason}")

    def _begin(self, s: Sample) -> None:
        if s.sample_id in self.fates:
            self.duplicates += 1
        self.fates[s.sample_id] = "pending"
        self._samples_of.setdefault(s.prompt_id, []).append(s.sample_id)

    def _settle(self, sample_id: str, fate: str) -> None:
        if self.fates.get(sample_id) != "pending":
            self.duplicates += 1
        self.fates[sample_id] = fate

    # --- output -------------------------------------------------------------------------
    def take_partials(self, trainer_version: int) -> list[list[Sample]]:
        """Every partial, grouped by prompt, for resumption first; hopeless ones replaced."""
        by_prompt: dict[str, list[Sample]] = {}
        while self._partials:
            _, s = self._partials.popitem(last=False)
            oldest = s.oldest_version
            if oldest is not None and trainer_version - oldest > self.max_staleness:
                self._drop([s], DropReason.STALE_PARTIAL)
                s = self._fresh_copy(s)
            elif s.response_ids:
                self.resumed += 1
            by_prompt.setdefault(s.prompt_id, []).append(s)
        for samples in by_prompt.values():
            self.resume(samples)
        return list(by_prompt.values())

    def _fresh_copy(self, s: Sample) -> Sample:
        self.started += 1
        fresh = Sample(
            sample_id=f"{s.sample_id.split('#')[0]}#{next(self._fresh_ids)}", prompt_id=s.prompt_id,
            prompt_ids=s.prompt_ids, max_new_tokens=s.max_new_tokens,
            min_new_tokens=s.min_new_tokens, episode=restart_episode(s.episode),
        )
        self._begin(fresh)
        return fresh

    def take_finished_prompts(self) -> list[str]:
        """Prompts dropped for good (by a filter) since the last call: nothing will ask for
        them again, so the driver can forget them (trained ones it forgets itself)."""
        finished, self._finished_prompts = self._finished_prompts, []
        return finished

    def take_requeued(self) -> Prompt | None:
        return self._requeued.popleft() if self._requeued else None

    def pop_batch(self, n_groups: int, trainer_version: int) -> list[Group] | None:
        """n_groups ready groups within η of trainer_version (FIFO), or None if too few."""
        fresh: deque[Group] = deque()
        for group in self._ready:
            if group_staleness(group, trainer_version) > self.max_staleness:
                self._drop(group.samples, DropReason.STALE)
                self._requeued.append(replace(group.prompt, attempt=group.prompt.attempt + 1))
            else:
                fresh.append(group)
        self._ready = fresh
        if len(self._ready) < n_groups:
            return None
        batch = [self._ready.popleft() for _ in range(n_groups)]
        self.trained += sum(len(g.samples) for g in batch)
        for group in batch:
            prompt_id = group.prompt.prompt_id
            if self._prompt_fates[prompt_id].startswith("trained@"):
                self.duplicates += 1  # a second group of one prompt: it was re-queued wrongly
            self._set_prompt_fate(prompt_id, f"trained@{trainer_version}")
            for s in group.samples:
                self._settle(s.sample_id, f"trained@{trainer_version}")
        self._training += n_groups
        return batch

    def release_batch(self, n_groups: int) -> None:
        """The batch's weights reached every worker: its slots may be reused."""
        self._training -= n_groups

    # --- accounting ---------------------------------------------------------------------
    @property
    def ready_groups(self) -> int:
        return len(self._ready)

    @property
    def active_groups(self) -> int:
        """Groups admitted whose slot is not yet free: open, ready, or in a batch whose weights
        have not reached the workers yet (the staleness gate counts these)."""
        return len(self._groups) + len(self._ready) + self._training

    @property
    def pending(self) -> int:
        open_finished = sum(len(g.finished) for g in self._groups.values())
        ready = sum(len(g.samples) for g in self._ready)
        return len(self._in_flight) + len(self._partials) + open_finished + ready

    @property
    def partial_count(self) -> int:
        return len(self._partials)

    def ledger(self) -> dict[str, int]:
        out = {"started": self.started, "trained": self.trained, "pending": self.pending,
               **{f"dropped/{k}": v for k, v in sorted(self.dropped.items())}}
        out["balance"] = self.started - self.trained - self.pending - sum(self.dropped.values())
        out["resumed"] = self.resumed
        out["duplicates"] = self.duplicates
        return out

    def _set_prompt_fate(self, prompt_id: str, fate: str) -> None:
        old = self._prompt_fates.get(prompt_id)
        if old is not None:
            self._prompt_kinds[_fate_kind(old)] -= 1
        self._prompt_fates[prompt_id] = fate
        self._prompt_kinds[_fate_kind(fate)] += 1

    def prompt_fates(self) -> dict[str, str]:
        """Every prompt's fate (module docstring)."""
        return dict(self._prompt_fates)

    def ledger_entries(self) -> list[dict]:
        """The ledger, a row per prompt: its fate and each of its sample ids' fates."""
        return [{"prompt_id": prompt_id, "fate": fate,
                 "samples": {i: self.fates[i] for i in self._samples_of.get(prompt_id, ())}}
                for prompt_id, fate in sorted(self._prompt_fates.items())]

    def prompt_counts(self) -> dict[str, int]:
        return {"prompts_started": len(self._samples_of),
                **{f"prompts_{k}": self._prompt_kinds[k]
                   for k in ("trained", "pending", "dropped", "skipped")}}

    def fate_counts(self) -> dict[str, int]:
        """The ledger recounted from the per-id fates: must equal `ledger()`'s counters."""
        kinds = Counter(f.partition("@")[0] for f in self.fates.values())
        return {"started": len(self.fates), "trained": kinds.pop("trained", 0),
                "pending": kinds.pop("pending", 0),
                **{k.replace(":", "/"): v for k, v in sorted(kinds.items())}}

    # --- checkpoint ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to continue; in-flight samples are saved as partials (resumed
        from where they were dispatched), so a resume neither loses nor duplicates a sample."""
        partials = [*self._partials.values(), *self._in_flight.values()]
        return {
            "groups": [(g.prompt, g.size, list(g.finished.values()))
                       for g in self._groups.values()],
            "partials": partials, "ready": list(self._ready), "requeued": list(self._requeued),
            "started": self.started, "trained": self.trained, "training": self._training,
            "resumed": self.resumed,
            "dropped": dict(self.dropped),
            "fresh_ids": next(self._fresh_ids),
            "fates": dict(self.fates), "duplicates": self.duplicates,
            "samples_of": {k: list(v) for k, v in self._samples_of.items()},
            "finished_prompts": list(self._finished_prompts),
            "prompt_fates": dict(self._prompt_fates),
            "curriculum": None if self.curriculum is None else self.curriculum.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self._groups = {
            prompt.prompt_id: _GroupState(prompt, size, {s.sample_id: s for s in finished})
            for prompt, size, finished in state["groups"]
        }
        self._partials = OrderedDict((s.sample_id, s) for s in state["partials"])
        self._ready, self._requeued = deque(state["ready"]), deque(state["requeued"])
        self._in_flight = {}
        self.started, self.trained = state["started"], state["trained"]
        self._training, self.resumed = state["training"], state["resumed"]
        self.dropped = dict(state["dropped"])
        self._fresh_ids = itertools.count(state["fresh_ids"])
        self.fates, self.duplicates = dict(state["fates"]), state["duplicates"]
        # absent in checkpoints written before the prompt ledger: it starts from here then
        self._samples_of = {k: list(v) for k, v in state.get("samples_of", {}).items()}
        self._finished_prompts = list(state.get("finished_prompts", []))
        self._prompt_fates = {}
        self._prompt_kinds = Counter()
        for prompt_id, fate in state.get("prompt_fates", {}).items():
            self._set_prompt_fate(prompt_id, fate)
        if self.curriculum is not None and state.get("curriculum") is not None:
            self.curriculum.load_state_dict(state["curriculum"])
