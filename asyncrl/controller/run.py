"""Wire a job from its config: resolve everything in the driver, then start the actors and loop.

Order matters (STYLE 8.1 rule 7): task, reward plugin, model and tokenizer are all resolved here
before the first actor starts, so a typo fails in seconds with a ConfigError, not remotely.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import AutoConfig, AutoTokenizer

from asyncrl.config import RESOLVED_NAME, JobConfig, dump_resolved, load_config
from asyncrl.controller.checkpoint import latest_checkpoint
from asyncrl.data.datasets import (
    FilePrompts,
    ProceduralPrompts,
    eval_examples,
    read_jsonl,
    to_prompt,
    tokenize_checked,
)
from asyncrl.data.expert import expert_text
from asyncrl.data.gym_task import unknown_characters
from asyncrl.data.tasks import TASKS
from asyncrl.errors import AsyncrlError, ConfigError, TrainerLost
from asyncrl.metrics.report import MetricsLog, setup_phase
from asyncrl.models.prepare import prepare_model
from asyncrl.reward.pool import RewardSpec
from asyncrl.rollout.workflow import Workflow, WorkflowSpec
from asyncrl.types import Prompt

log = logging.getLogger(__name__)

INIT_MODEL = "init_model"
REWARDS_NEEDING_ANSWERS = ("task", "exact_match", "regex", "math")  # compare with prompt.answer


@dataclass
class RunResult:
    run_dir: Path
    evals: list[tuple[int, float]] = field(default_factory=list)  # (policy_version, accuracy)
    final_model: Path | None = None
    ledger: dict[str, int] = field(default_factory=dict)
    interrupted: bool = False  # stopped by SIGTERM after writing a checkpoint
    restarts: int = 0  # times the job restarted from a checkpoint after losing its trainer

    @property
    def accuracy_gain(self) -> float:
        return self.evals[-1][1] - self.evals[0][1]


@dataclass
class JobContext:
    """Everything a loop needs, resolved in the driver."""

    config: JobConfig
    run_dir: Path
    model_path: Path
    task: Any
    tokenizer: Any
    reward: RewardSpec
    train_prompts: ProceduralPrompts | FilePrompts
    eval_prompts: list[Prompt]
    metrics: MetricsLog
    workflow_spec: WorkflowSpec | None = None  # rollout.workflow, built by each worker
    workflow: Workflow | None = None  # the driver's instance: starts each sample's episode


def build_task(config: JobConfig) -> Any:
    if config.data.task not in TASKS:
        raise ConfigError(
            f"data.task: unknown task {config.data.task!r}; known: {', '.join(sorted(TASKS))}"
        )
    try:
        task = TASKS[config.data.task](**config.data.task_kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"data.task_kwargs: {exc}") from None
    if config.model.path is None:  # the built-in tiny model: a fixed char vocabulary
        from asyncrl.models.tiny import CHARSET

        outside, longest = unknown_characters(task, CHARSET, seed=config.run.seed)
        if outside:
            raise ConfigError(
                f"data.task: {config.data.task} prompts or answers use characters the built-in "
                f"tiny model's vocabulary lacks: {' '.join(map(repr, sorted(outside)))} (it has "
                f"{CHARSET!r}); for reasoning_gym set data.task_kwargs.prompt_style=compact, or "
                "set model.path to a model with its own tokenizer")
        room = config.model.tiny.max_position_embeddings - config.rollout.max_new_tokens
        if longest > room:
            raise ConfigError(
                f"data.task: {config.data.task} prompts run to {longest} characters, more than "
                f"model.tiny.max_position_embeddings - rollout.max_new_tokens = {room}; raise "
                "model.tiny.max_position_embeddings or choose a task with shorter prompts")
    return task


def reward_spec(config: JobConfig, task: Any) -> RewardSpec:
    """What the reward workers build; checked here by building it once in the driver (a
    remote reward must answer its health check with the token)."""
    r = config.reward
    if r.type == "remote":
        token = os.environ.get(r.token_env)
        if not token:
            raise ConfigError(
                f"reward.token_env: environment variable {r.token_env!r} is not set; export the "
                "reward server's token in it (or point reward.token_env at the variable holding it)"
            )
        spec = RewardSpec(fn=r.fn, remote=dict(
            address=r.address, token=token, tls_ca=r.tls_ca, timeout_s=r.timeout_s,
            retries=r.retries, backoff_s=r.backoff_s,
            token_source=f"${r.token_env} (reward.token_env)"))
    else:
        spec = RewardSpec(fn=r.fn, task=task, kwargs=dict(r.kwargs),
                          transforms=[dict(t) for t in r.transforms])
    # prepare() may be called from inside an event loop (tests, notebooks): probe on a thread.
    with ThreadPoolExecutor(1) as thread:
        thread.submit(lambda: asyncio.run(_probe(spec()))).result()
    return spec


async def _probe(reward: Any) -> None:
    try:
        check = getattr(reward, "check", None)
        if check is not None:
            await check()
    finally:  # a reward may own processes or channels: release the probe's
        close = getattr(reward, "close", None)
        if close is not None and asyncio.iscoroutine(out := close()):
            await out


def prepare(config: JobConfig, *, resume: bool = False) -> JobContext:
    """Resolve the job in the driver. A fresh run replaces an earlier run of the same name; with
    `resume` the run directory and its checkpoint are kept and the model is not rebuilt."""
    task = build_task(config)
    reward = reward_spec(config, task)
    data = config.data
    files = {field: read_jsonl(f"data.{field}", path, data.prompt_key, data.answer_key)
             for field in ("train_file", "eval_file") if (path := getattr(data, field))}
    probe = _probe_prompt(config, task, files)
    workflow_spec, workflow = resolve_workflow(config, probe)
    if config.data.expert_field and expert_text(probe, config.data.expert_field) is None:
        source = "data.train_file's first line" if "train_file" in files else "the task"
        raise ConfigError(
            f"data.expert_field: {source} has no expert response in "
            f"{config.data.expert_field!r} (prompt {probe.text!r}); set it to 'answer' or to "
            "the JSONL field that holds the expert's answer, or drop data.expert_field")
    run_dir = _run_dir(config, resume=resume)
    dump_resolved(config, run_dir)
    seed = config.run.seed
    held_out = eval_examples(task, seed, config.data.eval_size)
    exclude = {ex.prompt for ex in held_out}
    if resume and config.model.path is None:
        model_path = run_dir / INIT_MODEL  # the trainer's weights come from the checkpoint
    else:
        what = "building the tiny model" if config.model.path is None else "checking the model"
        with setup_phase(what):
            model_path = prepare_model(config.model, task, seed=seed, exclude=exclude,
                                       out_dir=run_dir / INIT_MODEL)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    train_prompts, eval_prompts = _prompt_sources(config, task, tokenizer, model_path, held_out,
                                                  files)
    return JobContext(
        config=config, run_dir=run_dir, model_path=model_path, task=task, tokenizer=tokenizer,
        reward=reward, train_prompts=train_prompts, eval_prompts=eval_prompts,
        metrics=MetricsLog(run_dir / "metrics.jsonl"), workflow_spec=workflow_spec,
        workflow=workflow,
    )


def _probe_prompt(config: JobConfig, task: Any, files: dict[str, list[Prompt]]) -> Prompt:
    """A prompt of the kind the job trains on: the train file's first, else a task example."""
    if "train_file" in files:
        return files["train_file"][0]
    example = eval_examples(task, config.run.seed, 1)[0]
    return Prompt("probe", example.prompt, [], answer=example.answer,
                  metadata=dict(getattr(example, "metadata", None) or {}))


def resolve_workflow(config: JobConfig, probe: Prompt) -> tuple[WorkflowSpec | None,
                                                                 Workflow | None]:
    """Build rollout.workflow once in the driver and start an episode on `probe` (a prompt of
    the job's kind), so a bad path, kwargs or a task the environment cannot read fails here."""
    r = config.rollout
    if r.workflow is None:
        if r.workflow_kwargs:
            raise ConfigError("rollout.workflow_kwargs is set but rollout.workflow is not: set "
                              "rollout.workflow, or drop rollout.workflow_kwargs")
        return None, None
    spec = WorkflowSpec(r.workflow, dict(r.workflow_kwargs), max_turns=r.max_turns,
                        max_turn_tokens=r.max_turn_tokens)
    workflow = spec()
    try:
        state = workflow.start(probe)
    except Exception as exc:  # user code: any failure here is a config problem, named
        raise ConfigError(
            f"rollout.workflow: {r.workflow!r} cannot start an episode on a data.task "
            f"{config.data.task!r} prompt ({probe.text!r}): {type(exc).__name__}: {exc}; "
            "pair the workflow with a task whose prompts it reads") from None
    if not isinstance(state, dict):
        raise ConfigError(f"rollout.workflow: {r.workflow!r}: start(prompt) returned "
                          f"{type(state).__name__}, not a dict (the episode's state)")
    check = getattr(workflow, "check", None)  # e.g. python_tool runs a program in its sandbox
    if check is not None:
        with ThreadPoolExecutor(1) as thread:  # prepare() may run inside an event loop
            thread.submit(lambda: asyncio.run(check())).result()
    return spec, workflow


def _prompt_sources(
    config: JobConfig, task: Any, tokenizer: Any, model_path: Path, held_out: list[Any],
    files: dict[str, list[Prompt]],
) -> tuple[ProceduralPrompts | FilePrompts, list[Prompt]]:
    """Training stream and held-out set: from the JSONL files read in `files` where given,
    else from the task."""
    room = (AutoConfig.from_pretrained(model_path).max_position_embeddings
            - config.rollout.max_new_tokens)
    if "train_file" in files:
        rows = tokenize_checked("data.train_file", files["train_file"], tokenizer, room,
                                need_answers=config.reward.fn in REWARDS_NEEDING_ANSWERS,
                                default_budget=config.rollout.max_new_tokens)
        train = FilePrompts(rows, config.run.seed)
    else:
        train = ProceduralPrompts(task, tokenizer, config.run.seed,
                                  exclude={ex.prompt for ex in held_out})
    if "eval_file" in files:
        rows = files["eval_file"][: config.data.eval_size]
        evals = tokenize_checked("data.eval_file", rows, tokenizer, room, need_answers=True)
        for i, prompt in enumerate(evals):
            prompt.prompt_id = f"eval-{i}"
    else:
        evals = [to_prompt(f"eval-{i}", ex, tokenizer) for i, ex in enumerate(held_out)]
    return train, evals


def _run_dir(config: JobConfig, *, resume: bool) -> Path:
    run_dir = Path(config.run.output_dir) / config.run.name
    if resume:
        if latest_checkpoint(run_dir) is None:
            raise ConfigError(
                f"--resume: {str(run_dir)!r} has no checkpoint (checkpoint/step-*/); "
                "runs save one every run.checkpoint_every steps and when stopped by SIGTERM"
            )
        return run_dir
    if run_dir.exists():
        if any(run_dir.iterdir()) and not (run_dir / RESOLVED_NAME).is_file():
            raise ConfigError(
                f"run.name: {str(run_dir)!r} exists and is not an asyncrl run directory; "
                "choose another run.name or run.output_dir"
            )
        shutil.rmtree(run_dir)
    return run_dir


def load_resume_config(run_dir: Path, overrides: list[str]) -> JobConfig:
    """The config a run was started with (its resolved copy), plus overrides (e.g. run.steps)."""
    resolved = run_dir / RESOLVED_NAME
    if not resolved.is_file():
        raise ConfigError(f"--resume: {str(run_dir)!r} is not a run directory (no {RESOLVED_NAME})")
    return load_config(resolved, overrides)


def run(
    config: JobConfig,
    *,
    address: str | None = None,
    progress: bool = True,
    resume: bool = False,
) -> RunResult:
    """The Python API behind `asyncrl train`; `resume` continues from the run's checkpoint."""
    from asyncrl.cluster.launcher import init_ray, shutdown_ray
    from asyncrl.controller.loop import run_loop

    ctx = prepare(config, resume=resume)
    resume_from = latest_checkpoint(ctx.run_dir) if resume else None
    with setup_phase("starting Ray"):
        started = init_ray(
            address=address, num_cpus=config.run.num_cpus, namespace=f"asyncrl-{config.run.name}"
        )
    restarts = 0
    try:
        while True:
            try:
                result = asyncio.run(run_loop(ctx, progress=progress, resume_from=resume_from))
                result.restarts = restarts
                return result
            except TrainerLost as exc:
                resume_from = latest_checkpoint(ctx.run_dir)
                if resume_from is None or restarts >= config.run.max_restarts:
                    why = ("no checkpoint to restart from: set run.checkpoint_every"
                           if resume_from is None else
                           f"run.max_restarts={config.run.max_restarts} restarts already used")
                    raise AsyncrlError(f"the trainer died ({exc}); {why}") from exc
                restarts += 1
                log.warning("the trainer died (%s); restart %d/%d from %s", exc, restarts,
                            config.run.max_restarts, resume_from)
    finally:
        ctx.metrics.close()
        shutdown_ray(started)
