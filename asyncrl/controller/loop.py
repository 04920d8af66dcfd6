"""The controller: one loop for both modes, a producer and a consumer running concurrently.

    producer (RolloutManager.run)                     consumer (this loop)
    ─────────────────────────────                     ────────────────────
    admit under the gate ─► worker.generate           get_batch(B, version)   ◄─ DataManager
      ─► reward ─► DataManager.put                    [partial: abort in-flight → partial pool]
                                                      train ─► sync weights ─► release slots

`mode: sync` is this loop with η = 0: the gate admits exactly one batch of groups, which the
trainer takes, trains and syncs before any more are admitted (generate → train → sync).
`mode: async` with η ≥ 1 lets the producer run up to ⌊η/m⌋ batches ahead, so rollouts keep
going while the trainer trains and the trainer takes a batch as soon as one is ready.

| where work can wait          | bounded by                         |
|------------------------------|------------------------------------|
| producer, gate closed        | (⌊η/m⌋ + oversample) × B slots     |
| trainer, batch not ready     | run.batch_timeout_s, then an error |
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from pathlib import Path

from asyncrl.algo.expert import expert_coefficient
from asyncrl.algo.staleness import staleness
from asyncrl.controller.checkpoint import checkpoint_path
from asyncrl.controller.control import ControlFile
from asyncrl.controller.pools import Pools, batch_stats
from asyncrl.controller.run import JobContext, RunResult
from asyncrl.data.expert import expert_sample
from asyncrl.errors import AsyncrlError, WorkerLost
from asyncrl.metrics.names import RunMetrics
from asyncrl.metrics.report import StepProgress, setup_phase, write_ledger
from asyncrl.metrics.server import MetricsServer
from asyncrl.sync.broadcast import WeightSyncTimeout
from asyncrl.types import Group, TrainBatch

log = logging.getLogger(__name__)
PRODUCER_STOP_S = 60.0  # a round is a few DataManager calls; past this the actor is gone


class Controller:
    """Drives the pools: evaluation, the producer task, training steps, checkpoints."""

    def __init__(self, pools: Pools) -> None:
        self.pools, self.ctx = pools, pools.ctx
        self.producer: asyncio.Task | None = None

    def start_producer(self) -> None:
        self.producer = asyncio.create_task(self.pools.rollout.run())

    async def stop_producer(self, *, graceful: bool = True) -> None:
        """Stop admitting. Graceful: let the current round finish, so every prompt it took
        is started (and accounted); a round stuck past PRODUCER_STOP_S is cancelled."""
        producer, self.producer = self.producer, None
        if producer is None:
            return
        if graceful and not producer.done():
            self.pools.rollout.request_stop()
            await asyncio.wait([producer], timeout=PRODUCER_STOP_S)
        producer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await producer

    async def settle(self) -> dict[str, int]:
        """Stop admitting, interrupt every request and wait for them all: every sample is then
        in the DataManager (aborted ones as partials). Returns its ledger."""
        await self.stop_producer()
        await self.pools.rollout.abort_in_flight()
        await self.pools.rollout.drain()
        return await self.pools.data.stats()

    async def step(self) -> tuple[dict[str, float], list[Group]]:
        """Take one batch, train it, sync the weights; returns metrics and the trained groups."""
        pools, cfg = self.pools, self.ctx.config
        t0 = time.perf_counter()
        tokens_before = pools.rollout.generated_tokens
        rollout_busy, reward_busy = pools.rollout.busy_time(), pools.reward.busy_s
        version = pools.trainer_version
        groups = await self._next_batch(version)
        groups.sort(key=lambda g: g.prompt.prompt_id)  # arrival order is timing: keep it out
        t1 = time.perf_counter()
        if cfg.rollout.partial:
            await pools.rollout.abort_in_flight()
        # The driver's prompts (for rewards) are only those still in play: trained, or
        # dropped for good by a filter, a prompt is never scored again.
        finished = await pools.data.take_finished_prompts()
        for prompt_id in [g.prompt.prompt_id for g in groups] + finished:
            pools.prompts.pop(prompt_id, None)
        expert, expert_stats = self._expert_samples(groups)
        batch = TrainBatch.from_groups(groups, self.ctx.tokenizer.pad_token_id, **expert)
        train_metrics = await pools.train(batch)
        t2 = time.perf_counter()
        sync_stats = await self._sync_weights()
        await pools.data.release_batch(len(groups))
        t3 = time.perf_counter()
        rollout_busy, reward_busy = (pools.rollout.busy_time() - rollout_busy,
                                     pools.reward.busy_s - reward_busy)
        data_stats = await pools.data.stats()
        engine_compute = await pools.engine_compute_since_last()
        record = {
            "policy_version": pools.trainer_version,
            "train/batch_version": float(version),
            **batch_stats(groups, version),
            **train_metrics,
            **sync_stats,
            **expert_stats,
            **{f"data/{k}": float(v) for k, v in data_stats.items()},
            **pools.reward.stats(),
            "time/wait_batch_s": t1 - t0,
            "time/train_s": t2 - t1,
            "time/sync_s": t3 - t2,
            "time/rollout_busy_s": rollout_busy,
            "time/reward_busy_s": reward_busy,
            "time/trainer_busy_s": t2 - t1,
            **({} if engine_compute is None else {"time/engine_compute_s": engine_compute}),
            "rollout/step_tokens": float(pools.rollout.generated_tokens - tokens_before),
            "perf/tokens_per_s": (pools.rollout.generated_tokens - tokens_before) / (t3 - t0),
            "rollout/in_flight": float(pools.rollout.in_flight),
            "rollout/workers": float(len(pools.workers)),
            # Busy fractions: the share of this step each pool spent working (per worker).
            "busy/rollout": rollout_busy / (max(len(pools.workers), 1) * (t3 - t0)),
            "busy/reward": min(1.0, reward_busy / (len(pools.reward.workers) * (t3 - t0))),
            "busy/trainer": (t2 - t1) / (t3 - t0),
        }
        return record, groups

    def _expert_samples(self, groups: list[Group]) -> tuple[dict, dict[str, float]]:
        """CHORD (data.expert_field): the expert response of each trained group's prompt, and
        this step's μ (asyncrl.algo.expert)."""
        cfg = self.ctx.config
        if not cfg.data.expert_field:
            return {}, {}
        algo = cfg.algorithm
        step = self.pools.trainer_version // cfg.trainer.minibatches  # batches trained so far
        mu = expert_coefficient(
            step, cfg.run.steps, start=algo.expert_coef, schedule=algo.expert_schedule,
            end=algo.expert_coef if algo.expert_coef_end is None else algo.expert_coef_end)
        samples = [expert_sample(g.prompt, cfg.data.expert_field, self.ctx.tokenizer,
                                 cfg.rollout.max_new_tokens) for g in groups]
        found = [s for s in samples if s is not None]
        stats = {"expert/coef": mu, "expert/samples": float(len(found)),
                 "expert/missing": float(len(samples) - len(found))}
        return {"expert": found, "expert_coef": mu}, stats

    async def _sync_weights(self) -> dict[str, float]:
        """Broadcast; if a worker died (before or during it), replace the dead ones and rebuild
        the group, which also hands every worker the current weights."""
        pools = self.pools
        before = pools.workers_replaced
        if pools.rollout.lost_workers:
            await pools.replace_lost_workers()
        try:
            stats = await pools.sync_weights()
        except (WorkerLost, WeightSyncTimeout) as exc:
            log.warning("weight sync failed (%s); rebuilding the weight group", exc)
            await pools.rebuild_weight_group(sync=True)
            stats = {}
        return {**stats, "rollout/workers_replaced": float(pools.workers_replaced - before)}

    async def _next_batch(self, version: int) -> list[Group]:
        """Wait for a batch; a rollout worker lost meanwhile is replaced at once (with one
        worker, or with every worker lost, no batch could come otherwise)."""
        cfg, rollout = self.ctx.config, self.pools.rollout
        batch = asyncio.create_task(self.pools.data.get_batch(
            cfg.rollout.prompts_per_step, version, cfg.run.batch_timeout_s))
        try:
            while not batch.done():
                lost = asyncio.create_task(rollout.worker_lost.wait())
                done, _ = await asyncio.wait([batch, self.producer, lost],
                                             return_when=asyncio.FIRST_COMPLETED)
                lost.cancel()
                if self.producer in done:  # it never ends on its own: surface its error
                    self.producer.result()
                    raise AsyncrlError("the rollout producer stopped unexpectedly")
                if lost in done:
                    rollout.worker_lost.clear()
                    if rollout.lost_workers:
                        await self.pools.replace_lost_workers()
        finally:
            batch.cancel()  # a no-op once it is done
        try:
            return batch.result()
        except TimeoutError:
            raise AsyncrlError(
                f"no batch of {cfg.rollout.prompts_per_step} groups within run.batch_timeout_s="
                f"{cfg.run.batch_timeout_s}s at policy version {version}: rollouts are too "
                "slow or every group is dropped (see the data/* counters in metrics.jsonl); "
                "raise run.batch_timeout_s or check the reward"
            ) from None

    async def checkpoint(self, step: int) -> Path:
        """Pause admission, save the whole job after `step`, resume admission."""
        await self.stop_producer()
        path = await self.pools.checkpoint(checkpoint_path(self.ctx.run_dir, step))
        self.start_producer()
        return path


async def run_loop(
    ctx: JobContext, *, progress: bool = True, resume_from: Path | None = None
) -> RunResult:
    cfg = ctx.config
    result = RunResult(run_dir=ctx.run_dir)
    with setup_phase(f"starting {cfg.rollout.num_workers} rollout worker(s) "
                     f"({cfg.rollout.engine}), the trainer ({cfg.trainer.backend}) and rewards"):
        pools = await Pools.start(ctx)
    controller = Controller(pools)
    sigterm = _on_sigterm()
    control = ControlFile(ctx.run_dir)
    metrics = RunMetrics()
    server = None
    if cfg.metrics.port is not None:
        server = MetricsServer(metrics, host=cfg.metrics.host, port=cfg.metrics.port)
        log.info("Prometheus metrics at %s", server.url)
    try:
        if resume_from is not None:
            await pools.restore(resume_from)
        start = pools.trainer_version // cfg.trainer.minibatches
        accuracy = await pools.evaluate()
        result.evals.append((pools.trainer_version, accuracy))
        ctx.metrics.write({"step": start, "policy_version": pools.trainer_version,
                           "eval/accuracy": accuracy})
        controller.start_producer()
        last = time.perf_counter()
        with StepProgress(cfg.run.steps, f"train ({cfg.mode})") as bar:
            for step in range(start + 1, cfg.run.steps + 1):
                if scale := control.poll().get("rollout_workers"):
                    await pools.scale_rollout(scale)
                record, groups = await controller.step()
                if step % cfg.run.eval_every == 0 or step == cfg.run.steps:
                    t0 = time.perf_counter()
                    accuracy = await pools.evaluate()
                    result.evals.append((record["policy_version"], accuracy))
                    record |= {"eval/accuracy": accuracy, "time/eval_s": time.perf_counter() - t0}
                if sigterm.is_set() or (cfg.run.checkpoint_every
                                        and step % cfg.run.checkpoint_every == 0):
                    await controller.checkpoint(step)
                now = time.perf_counter()
                record |= {"step": step, "time/step_s": now - last,
                           "rollout/generated_tokens": pools.rollout.generated_tokens}
                last = now
                ctx.metrics.write(record)
                version = int(record["train/batch_version"])
                metrics.observe_step(record, [staleness(s.token_versions, version)
                                              for g in groups for s in g.samples])
                if progress:
                    bar.update(step, reward=record["reward/mean"], acc=accuracy,
                               tok_s=record["perf/tokens_per_s"])
                if sigterm.is_set():
                    result.interrupted = True
                    break
        result.ledger = await controller.settle()
        if not result.interrupted:
            result.final_model = await pools.save_final()
        write_ledger(ctx.run_dir / "ledger.jsonl", await pools.data.ledger_entries())
    finally:
        with contextlib.suppress(Exception):  # the error that got us here is the one to show
            await controller.stop_producer(graceful=False)
        pools.close()
        if server is not None:
            server.stop()
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGTERM)
    return result


def _on_sigterm() -> asyncio.Event:
    """An event set by SIGTERM: the loop then checkpoints after the current step and stops.
    Only the main thread can take signals; elsewhere the event is never set."""
    event = asyncio.Event()
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, event.set)
    return event
