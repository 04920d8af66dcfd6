"""The actors of one job and the operations the loop composes: evaluate, train, sync weights.

Pools: rollout workers (one engine each), the trainer, the DataManager; the RolloutManager runs
in the driver's event loop and talks to them through ActorRefs.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from asyncrl.algo.staleness import staleness
from asyncrl.cluster.actors import ActorRef, LocalRef, kill_all, node_ip, run_in_actor, spawn
from asyncrl.cluster.placement import PoolPlacement, bundle_of
from asyncrl.controller.checkpoint import (
    TRAINER_DIR,
    load_rng_state,
    read_state,
    save_rng_state,
    write_checkpoint,
)
from asyncrl.controller.run import JobContext
from asyncrl.data.curriculum import Curriculum, FilterRule, SampleRule
from asyncrl.data.manager import DataManager
from asyncrl.errors import AsyncrlError, TrainerLost, WorkerLost
from asyncrl.reward.pool import RewardPool, RewardWorker, pool_call_timeout
from asyncrl.rollout.manager import RolloutManager
from asyncrl.rollout.worker import RolloutWorker
from asyncrl.rollout.workflow import Workflow
from asyncrl.sync.broadcast import WeightBroadcast, WeightSyncTimeout
from asyncrl.train.worker import TrainerWorker
from asyncrl.types import Group, Prompt, Sample, SamplingParams, new_episode

GREEDY = SamplingParams(temperature=0.0)
WORKER_PING_TIMEOUT_S = 30.0  # a live worker answers a version query between decoding steps
GROUP_ATTEMPTS = 5  # tries to form the weight group while rollout workers keep dying
SCALE_UP_PLACEMENT_S = 30.0  # a scale-up's bundle must be placed quickly, or it is skipped

log = logging.getLogger(__name__)


def new_samples(prompt: Prompt, n: int, max_new_tokens: int,
                workflow: Workflow | None = None) -> list[Sample]:
    """The n samples of a prompt. A prompt may set its own budget: `max_new_tokens` and
    `min_new_tokens` in its metadata (e.g. JSONL fields) override rollout.max_new_tokens and
    force lengths (benchmarks of long-tail loads). Ids are unique per attempt of the prompt.
    With a workflow, each sample starts its own episode (rollout.workflow)."""
    budget = int(prompt.metadata.get("max_new_tokens", max_new_tokens))
    floor = min(int(prompt.metadata.get("min_new_tokens", 0)), budget)
    retry = f"~{prompt.attempt}" if prompt.attempt else ""
    return [
        Sample(sample_id=f"{prompt.prompt_id}/{i}{retry}", prompt_id=prompt.prompt_id,
               prompt_ids=list(prompt.input_ids), max_new_tokens=budget, min_new_tokens=floor,
               episode=new_episode(workflow.start(prompt)) if workflow is not None else {})
        for i in range(n)
    ]


@dataclass
class Pools:
    ctx: JobContext
    workers: list[ActorRef]
    trainer: ActorRef
    data: ActorRef
    rollout: RolloutManager
    reward: RewardPool
    prompts: dict[str, Prompt] = field(default_factory=dict)  # in play, for rewards
    trainer_version: int = 0
    _groups_formed: int = 0
    _workers_spawned: int = 0
    _joining: list[ActorRef] = field(default_factory=list)  # spawned, weights not yet loaded
    workers_replaced: int = 0
    _compute_seen: dict[str, float] = field(default_factory=dict)  # engine seconds read, by worker
    placements: list[PoolPlacement] = field(default_factory=list)  # released at close
    _rollout_placement: PoolPlacement | None = None

    @classmethod
    async def start(cls, ctx: JobContext) -> Pools:
        cfg, r = ctx.config, ctx.config.rollout
        model_path = str(ctx.model_path)
        placed = _placements(ctx)
        rollout_placement, reward_placement = placed["rollout"], placed["reward"]
        trainer_placement = placed["trainer"]
        sizes = {"rollout": r.num_workers, "reward": cfg.reward.num_workers, "trainer": 1}
        placements = [p for p in placed.values() if p is not None]
        try:
            for pool, placement in placed.items():
                if placement is not None:
                    await placement.reserve(sizes[pool])
        except BaseException:  # one pool could not be placed: release the others' reservations
            for placement in placements:
                placement.close()
            raise
        workers = [_spawn_rollout_worker(ctx, i, rollout_placement) for i in range(r.num_workers)]
        trainer_name = f"{cfg.run.name}/trainer-rank-0"
        trainer = spawn(TrainerWorker, model_path, cfg, name=trainer_name,
                        num_cpus=cfg.trainer.num_cpus, num_gpus=cfg.trainer.num_gpus,
                        resources=cfg.trainer.resources,
                        scheduling_strategy=trainer_placement.take(trainer_name)
                        if trainer_placement else None)
        curriculum = _curriculum(cfg)
        data = spawn(DataManager, group_size=r.n_samples, max_staleness=cfg.max_staleness,
                     drop_all_equal=cfg.data.drop_all_equal, curriculum=curriculum,
                     name=f"{cfg.run.name}/data-manager", num_cpus=0)
        prompts: dict[str, Prompt] = {}

        def start_prompt(prompt: Prompt, n: int) -> list[Sample]:
            prompts[prompt.prompt_id] = prompt  # only started ones: a skipped one is never scored
            return new_samples(prompt, n, r.max_new_tokens, ctx.workflow)

        reward = _reward_pool(ctx, reward_placement)

        async def score(samples: list[Sample]) -> None:
            for s in samples:  # an episode whose environment raised is not scored
                if "error" in s.episode:
                    s.reward = reward.failed(f"workflow: {s.episode['error']}")
            await reward.score([s for s in samples if "error" not in s.episode], prompts)

        rollout = RolloutManager(
            workers, data, next_prompt=ctx.train_prompts.next, new_samples=start_prompt,
            score=score,
            params=SamplingParams(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k),
            max_staleness=cfg.max_staleness, batch_groups=r.prompts_per_step,
            versions_per_batch=cfg.trainer.minibatches, oversample=r.oversample,
            group_size=r.n_samples, planned=curriculum is not None,
            request_timeout_s=r.request_timeout_s,
        )
        pools = cls(ctx=ctx, workers=workers, trainer=trainer, data=data, rollout=rollout,
                    reward=reward, prompts=prompts, _workers_spawned=len(workers),
                    placements=placements, _rollout_placement=rollout_placement)
        await pools.rebuild_weight_group(sync=False)  # every process loaded the same weights
        return pools

    def close(self) -> None:
        reward_actors = [w for w in self.reward.workers if isinstance(w, ActorRef)]
        kill_all([*self.workers, self.trainer, self.data, *reward_actors])
        for placement in self.placements:
            placement.close()

    async def evaluate(self) -> float:
        """Held-out greedy exact-match accuracy, scored by the task itself."""
        ctx = self.ctx
        by_id = {p.prompt_id: p for p in ctx.eval_prompts}
        for attempt in range(1, GROUP_ATTEMPTS + 1):
            samples = [new_samples(p, 1, ctx.config.rollout.max_new_tokens, ctx.workflow)[0]
                       for p in ctx.eval_prompts]
            workers = list(self.workers)
            shards = [samples[i :: len(workers)] for i in range(len(workers))]
            try:
                done = await asyncio.gather(
                    *(self._evaluate_on(w, shard) for w, shard in zip(workers, shards,
                                                                       strict=True)))
                break
            except WorkerLost as exc:  # evaluation is not accounted: just run it again
                log.warning("evaluation attempt %d lost a worker (%s)", attempt, exc)
                await self.replace_lost_workers()
        else:
            raise AsyncrlError(f"evaluation failed {GROUP_ATTEMPTS} times: workers keep dying")
        correct = [bool(_score_eval(ctx.task, by_id[s.prompt_id], s.response_text).correct)
                   for shard in done for s in shard]
        return sum(correct) / len(correct)

    async def _evaluate_on(self, worker: ActorRef, samples: list[Sample]) -> list[Sample]:
        timeout = self.ctx.config.rollout.request_timeout_s
        try:
            return await asyncio.wait_for(worker.generate(samples, GREEDY), timeout)
        except TimeoutError:
            self.rollout.flag_lost(worker.name)  # hung: replaced like a dead one
            raise WorkerLost(f"{worker.name} did not finish an evaluation request within "
                             f"rollout.request_timeout_s={timeout}s") from None

    async def train(self, batch) -> dict[str, float]:
        self.rollout.set_trainer_version(self.trainer_version + self.ctx.config.trainer.minibatches)
        timeout = self.ctx.config.trainer.call_timeout_s
        metrics = await _on_trainer(self.trainer.step(batch), timeout)
        self.trainer_version = await _on_trainer(self.trainer.policy_version(), timeout)
        return metrics

    async def form_weight_group(self) -> None:
        """(Re)build the broadcast group of the trainer and every current worker. Called at
        start and whenever membership changes: a group's world size is fixed."""
        self._groups_formed += 1
        host = await run_in_actor(self.trainer, node_ip)
        port = await run_in_actor(self.trainer, WeightBroadcast.free_port, host)
        sync = self.ctx.config.sync
        group = dict(world_size=len(self.workers) + 1, host=host, port=port,
                     backend=sync.backend, device=self.ctx.config.trainer.device,
                     bucket_bytes=int(sync.bucket_mb * (1 << 20)), timeout_s=sync.timeout_s,
                     group_name=f"weights-{self._groups_formed}")
        await asyncio.gather(
            self.trainer.open_weight_group(group),
            *(w.join_weight_group({**group, "rank": rank})
              for rank, w in enumerate(self.workers, start=1)))

    async def engine_compute_since_last(self) -> float | None:
        """Engine compute seconds of every worker since the last call (None when an engine
        cannot measure it); a worker that does not answer is left out of this reading."""
        workers = list(self.workers)
        readings = await asyncio.gather(*(w.compute_seconds() for w in workers),
                                        return_exceptions=True)
        total = 0.0
        for worker, seconds in zip(workers, readings, strict=True):
            if seconds is None:
                return None
            if isinstance(seconds, float):
                total += seconds - self._compute_seen.get(worker.name, 0.0)
                self._compute_seen[worker.name] = seconds
        return total

    async def sync_weights(self) -> dict[str, float]:
        """Broadcast the trainer's weights; returns once every worker has loaded them."""
        stats, *versions = await asyncio.gather(
            _on_trainer(self.trainer.broadcast_weights(), self.ctx.config.trainer.call_timeout_s),
            *(w.receive_weights() for w in self.workers))
        assert all(v == self.trainer_version for v in versions), (versions, self.trainer_version)
        return stats

    def _spawn_worker(self) -> ActorRef:
        """A new rollout worker (in a free bundle of the pool's placement, if it has one)."""
        self._workers_spawned += 1
        return _spawn_rollout_worker(self.ctx, self._workers_spawned - 1,
                                     self._rollout_placement)

    def _kill_workers(self, workers: list[ActorRef]) -> None:
        kill_all(workers)
        if self._rollout_placement is not None:
            for worker in workers:
                self._rollout_placement.release(worker.name)

    async def add_worker(self) -> ActorRef:
        """A worker joining a running job gets the current weights before its first request."""
        if self._rollout_placement is not None:  # the trainer waits meanwhile: briefly
            await self._rollout_placement.reserve(1, timeout_s=SCALE_UP_PLACEMENT_S)
        worker = self._spawn_worker()
        self.workers.append(worker)
        self._joining.append(worker)
        await self.rebuild_weight_group(sync=True)
        return worker

    async def scale_rollout(self, target: int) -> int:
        """Grow or shrink the rollout pool to `target` workers while the run goes on: a new
        worker gets the current weights before its first request; a removed one's in-flight
        requests come back as partials and are resumed elsewhere. Returns the change."""
        if target < 1:
            raise AsyncrlError(f"rollout workers: need at least 1 (asked for {target})")
        change = target - len(self.workers)
        for added in range(change):
            try:
                await self.add_worker()
            except AsyncrlError as exc:  # the cluster is full: keep training with what fits
                log.warning("scaling the rollout pool up stopped at %d workers: %s",
                            len(self.workers), exc)
                change = added
                break
        if change < 0:
            leaving = self.workers[change:]
            for worker in leaving:
                await self.rollout.retire_worker(worker.name)
            self.workers = self.workers[:change]
            self._kill_workers(leaving)
            await self.rebuild_weight_group(sync=False)  # the rest hold the current weights
        if change:
            log.info("rollout pool scaled to %d workers (%+d)", len(self.workers), change)
        return change

    async def replace_lost_workers(self) -> int:
        """Replace every rollout worker that died (or no longer answers) with a fresh one that
        receives the current weights; their in-flight samples were already re-queued by the
        RolloutManager. Returns how many were replaced."""
        before = self.workers_replaced
        await self.rebuild_weight_group(sync=True)
        return self.workers_replaced - before

    async def rebuild_weight_group(self, *, sync: bool) -> None:
        """Form the broadcast group of the trainer and every worker (and, with `sync`, hand them
        the current weights). Dead workers are replaced first, and again whenever one dies
        meanwhile; a dead trainer raises TrainerLost."""
        for attempt in range(1, GROUP_ATTEMPTS + 1):
            if await self._swap_dead_workers():
                sync = True  # fresh workers need the trainer's weights
            try:
                await self.form_weight_group()
                if sync:
                    await self.sync_weights()
                for worker in self._joining:  # only now do they hold the current weights
                    if worker in self.workers:
                        self.rollout.add_worker(worker)
                self._joining.clear()
                return
            except (WorkerLost, WeightSyncTimeout) as exc:
                log.warning("weight group attempt %d/%d failed (%s)", attempt, GROUP_ATTEMPTS,
                            exc)
                sync = True  # a broken broadcast leaves workers on mixed weights
        raise AsyncrlError(f"could not form the weight group in {GROUP_ATTEMPTS} attempts: "
                           "rollout workers keep dying (see their logs); check their memory "
                           "and sync.timeout_s")

    async def _swap_dead_workers(self) -> int:
        """Swap every worker that does not answer a ping, or that the RolloutManager found
        lost (dead, or past rollout.request_timeout_s), for a fresh one, which joins the
        RolloutManager once the rebuilt group handed it the weights. Returns how many."""
        alive, lost = [], []
        flagged = set(self.rollout.lost_workers)  # dead, or alive but hung on a request
        for worker in self.workers:
            if worker.name in flagged:
                lost.append(worker)
                continue
            try:
                await asyncio.wait_for(worker.policy_version(), WORKER_PING_TIMEOUT_S)
                alive.append(worker)
            except (WorkerLost, TimeoutError):
                lost.append(worker)
        self.rollout.lost_workers.clear()
        if not lost:
            return 0
        log.warning("replacing %d lost rollout worker(s): %s", len(lost),
                    ", ".join(w.name for w in lost))
        self._kill_workers(lost)  # their bundles go to their successors
        for worker in lost:
            self.rollout.remove_worker(worker.name)
        fresh = [self._spawn_worker() for _ in lost]
        self.workers = alive + fresh
        self._joining += fresh
        self.workers_replaced += len(lost)
        return len(lost)

    async def checkpoint(self, path: Path) -> Path:
        """Save the whole job (call with the producer stopped)."""
        state = {
            "data": await self.data.state_dict(),
            "prompt_cursor": self.ctx.train_prompts.state_dict(),
            "prompts": self.prompts,
            "trainer_version": self.trainer_version,
        }

        async def save_trainer(directory: Path) -> None:
            await self.trainer.save(str(directory))
            await run_in_actor(self.trainer, save_rng_state, str(directory))

        return await write_checkpoint(path, save_trainer=save_trainer, state=state,
                                      keep=self.ctx.config.run.keep_checkpoints)

    async def restore(self, path: Path) -> None:
        """Load a checkpoint into freshly started pools; workers get the restored weights."""
        state = read_state(path)
        await self.trainer.load(str(path / TRAINER_DIR))
        await run_in_actor(self.trainer, load_rng_state, str(path / TRAINER_DIR))
        await self.data.load_state_dict(state["data"])
        self.ctx.train_prompts.load_state_dict(state["prompt_cursor"])
        self.prompts.update(state["prompts"])
        self.trainer_version = state["trainer_version"]
        assert await self.trainer.policy_version() == self.trainer_version
        self.rollout.set_trainer_version(self.trainer_version)
        await self.sync_weights()

    async def save_final(self) -> Path:
        final = self.ctx.run_dir / "final_model"
        await self.trainer.save(str(final))
        self.ctx.tokenizer.save_pretrained(final)
        return final


def _score_eval(task, prompt: Prompt, response: str):
    """The task's own verdict; a task that needs more than the answer (e.g. a reasoning-gym
    entry in the prompt's metadata) scores the whole prompt."""
    score_prompt = getattr(task, "score_prompt", None)
    if score_prompt is not None:
        return score_prompt(prompt, response)
    return task.score(response, prompt.answer or "")


async def _on_trainer(call, timeout_s: float):
    """Await a trainer call; its death, or a hang past trainer.call_timeout_s, becomes
    TrainerLost (the job restarts from a checkpoint), not a rollout worker's loss."""
    try:
        return await asyncio.wait_for(call, timeout_s)
    except WorkerLost as exc:
        raise TrainerLost(str(exc)) from exc
    except TimeoutError:
        raise TrainerLost(f"no answer within trainer.call_timeout_s={timeout_s}s") from None


def _placements(ctx: JobContext) -> dict[str, PoolPlacement | None]:
    """Each pool's placement group (rollout, reward, trainer), where its config asks for one."""
    cfg = ctx.config
    r, rw, t = cfg.rollout, cfg.reward, cfg.trainer
    pools = {"rollout": (r.placement, bundle_of(r.worker_num_cpus, r.worker_num_gpus,
                                                r.worker_resources)),
             "reward": (rw.placement, bundle_of(rw.num_cpus, rw.num_gpus, rw.resources)),
             "trainer": (t.placement, bundle_of(t.num_cpus, t.num_gpus, t.resources))}
    return {pool: PoolPlacement(f"{pool}.placement", bundle, strategy,
                                name=f"{cfg.run.name}/{pool}",
                                ready_timeout_s=cfg.run.placement_timeout_s)
            if strategy else None for pool, (strategy, bundle) in pools.items()}


def _reward_pool(ctx: JobContext, placement: PoolPlacement | None) -> RewardPool:
    """Reward workers as actors, or one in the driver's process when reward.num_workers is 0.
    With a placement, a replaced worker's successor takes its bundle."""
    cfg = ctx.config.reward
    options = dict(concurrency=cfg.concurrency, timeout_s=cfg.timeout_s)

    def spawn_worker(index: int) -> ActorRef | LocalRef:
        if cfg.num_workers == 0:
            return LocalRef(RewardWorker(ctx.reward, **options), "reward-worker-local")
        name = f"{ctx.config.run.name}/reward-worker-{index}"
        return spawn(RewardWorker, ctx.reward, name=name, num_cpus=cfg.num_cpus,
                     num_gpus=cfg.num_gpus, resources=cfg.resources,
                     scheduling_strategy=placement.take(name) if placement else None,
                     **options)

    def kill(ref: ActorRef) -> None:
        kill_all([ref])
        if placement is not None:
            placement.release(ref.name)

    return RewardPool(
        spawn_worker, num_workers=max(cfg.num_workers, 1), batch_size=cfg.batch_size,
        call_timeout_s=pool_call_timeout(cfg.timeout_s, cfg.batch_size, cfg.concurrency),
        retries=cfg.retries, backoff_s=cfg.backoff_s, on_failure=cfg.on_failure,
        failure_value=cfg.failure_value,
        kill=kill if cfg.num_workers else None,
    )


def _spawn_rollout_worker(
    ctx: JobContext, index: int, placement: PoolPlacement | None
) -> ActorRef:
    """Worker `index` (never reused: a replacement gets a new index, name and sampling seed)."""
    cfg = ctx.config
    vllm = cfg.rollout.vllm.model_dump() if cfg.rollout.engine == "vllm" else None
    name = f"{cfg.run.name}/rollout-worker-{index}"
    return spawn(RolloutWorker, str(ctx.model_path), cfg.rollout.engine,
                 seed=cfg.run.seed + 1000 * index, name=name,
                 num_cpus=cfg.rollout.worker_num_cpus,
                 num_gpus=cfg.rollout.worker_num_gpus, resources=cfg.rollout.worker_resources,
                 scheduling_strategy=placement.take(name) if placement else None,
                 vllm_options=vllm, workflow=ctx.workflow_spec)


def _curriculum(cfg) -> Curriculum | None:
    """data.curriculum and rollout.adaptive_samples as the DataManager's rules (None: off)."""
    c, a = cfg.data.curriculum, cfg.rollout.adaptive_samples
    if not c.enabled and a.mode == "off":
        return None
    return Curriculum(
        default_n=cfg.rollout.n_samples,
        filter=FilterRule(low=c.low, high=c.high, min_samples=c.min_samples,
                          max_skips=c.max_skips) if c.enabled else None,
        samples=None if a.mode == "off" else SampleRule(
            mode=a.mode, n_min=a.n_min, n_max=a.n_max, stage2_version=a.stage2_version,
            stage2_n=a.stage2_n))


def batch_stats(groups: list[Group], trainer_version: int) -> dict[str, float]:
    samples = [s for g in groups for s in g.samples]
    rewards = [s.reward for s in samples if s.reward is not None and s.reward.ok]
    stale = [staleness(s.token_versions, trainer_version) for s in samples]
    return {
        "reward/mean": sum(r.value for r in rewards) / len(rewards) if rewards else math.nan,
        "reward/accuracy": sum(bool(r.correct) for r in rewards) / max(len(rewards), 1),
        "rollout/response_len": sum(len(s.response_ids) for s in samples) / len(samples),
        "staleness/mean": sum(stale) / len(stale),
        "staleness/max": float(max(stale)),
        "batch/samples": float(len(samples)),  # groups may differ in size (adaptive_samples)
        "batch/group_size_min": float(min(len(g.samples) for g in groups)),
        "batch/group_size_max": float(max(len(g.samples) for g in groups)),
    }
