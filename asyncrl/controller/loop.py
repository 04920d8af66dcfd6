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
| producer, gate closed        | (⌊η/m⌋ + 1) × B × oversample slots |
| trainer, batch not ready     | run.batch_timeout_s, then an error |
"""

from __future__ import annotations

import asyncio
import logging
import time

from asyncrl.controller.pools import Pools, batch_stats
from asyncrl.controller.run import JobContext, RunResult
from asyncrl.errors import AsyncrlError
from asyncrl.metrics.report import StepProgress
from asyncrl.types import TrainBatch

log = logging.getLogger(__name__)


async def run_loop(ctx: JobContext, *, progress: bool = True) -> RunResult:
    cfg = ctx.config
    result = RunResult(run_dir=ctx.run_dir)
    pools = await Pools.start(ctx)
    producer = None
    try:
        accuracy = await pools.evaluate()
        result.evals.append((0, accuracy))
        ctx.metrics.write({"step": 0, "policy_version": 0, "eval/accuracy": accuracy})
        producer = asyncio.create_task(pools.rollout.run())
        last = time.perf_counter()
        with StepProgress(cfg.run.steps, f"train ({cfg.mode})") as bar:
            for step in range(1, cfg.run.steps + 1):
                record = await _one_step(pools, ctx, producer)
                if step % cfg.run.eval_every == 0 or step == cfg.run.steps:
                    t0 = time.perf_counter()
                    accuracy = await pools.evaluate()
                    result.evals.append((record["policy_version"], accuracy))
                    record |= {"eval/accuracy": accuracy, "time/eval_s": time.perf_counter() - t0}
                now = time.perf_counter()
                tokens = pools.rollout.generated_tokens
                record |= {"step": step, "time/step_s": now - last,
                           "rollout/generated_tokens": tokens}
                last = now
                ctx.metrics.write(record)
                if progress:
                    bar.update(step, reward=record["reward/mean"], acc=accuracy,
                               tok_s=record["perf/tokens_per_s"])
        producer.cancel()
        await pools.rollout.abort_in_flight()
        await pools.rollout.drain()
        result.final_model = await pools.save_final()
        result.ledger = await pools.data.stats()
    finally:
        if producer is not None:
            producer.cancel()
        pools.close()
    return result


async def _one_step(pools: Pools, ctx: JobContext, producer: asyncio.Task) -> dict[str, float]:
    cfg = ctx.config
    t0 = time.perf_counter()
    tokens_before = pools.rollout.generated_tokens
    version = pools.trainer_version
    batch_task = asyncio.create_task(pools.data.get_batch(
        cfg.rollout.prompts_per_step, version, cfg.run.batch_timeout_s))
    done, _ = await asyncio.wait([batch_task, producer], return_when=asyncio.FIRST_COMPLETED)
    if producer in done:  # the producer must never end; surface its error
        batch_task.cancel()
        producer.result()
        raise AsyncrlError("the rollout producer stopped unexpectedly")
    try:
        groups = batch_task.result()
    except TimeoutError:
        raise AsyncrlError(
            f"no batch of {cfg.rollout.prompts_per_step} groups within run.batch_timeout_s="
            f"{cfg.run.batch_timeout_s}s at policy version {version}: rollouts are too slow "
            "or every group is being dropped (see metrics.jsonl data/* counters); raise "
            "run.batch_timeout_s or check the reward"
        ) from None
    t1 = time.perf_counter()
    if cfg.rollout.partial:
        await pools.rollout.abort_in_flight()
    batch = TrainBatch.from_groups(groups, ctx.tokenizer.pad_token_id)
    train_metrics = await pools.train(batch)
    t2 = time.perf_counter()
    sync_stats = await pools.sync_weights()
    await pools.data.release_batch(len(groups))
    t3 = time.perf_counter()
    generated = pools.rollout.generated_tokens - tokens_before
    data_stats = await pools.data.stats()
    return {
        "policy_version": pools.trainer_version,
        **sync_stats,
        **batch_stats(groups, version),
        **train_metrics,
        **{f"data/{k}": float(v) for k, v in data_stats.items()},
        "time/wait_batch_s": t1 - t0,
        "time/train_s": t2 - t1,
        "time/sync_s": t3 - t2,
        "perf/tokens_per_s": generated / max(t3 - t0, 1e-9),
    }
