"""The bad-input corpus: configs, datasets and reward plugins that must fail fast, each with a
message naming the field (or file and line) and the fix. The CLI turns every one of these into
exit code 2 without a traceback (tests/unit/test_config.py runs a sample through the CLI)."""

from __future__ import annotations

import json

import pytest

from asyncrl.config import load_config
from asyncrl.controller.run import prepare
from asyncrl.errors import AsyncrlError, ConfigError

# (overrides, a piece of the message that names the field and/or the fix)
BAD_CONFIGS = [
    (["rollout.n_sample=4"], "rollout.n_sample: unknown key. did you mean 'n_samples'"),
    (["rollouts.n_samples=4"], "rollouts: unknown key. did you mean 'rollout'"),
    (["algorithm.clip=0.2"], "algorithm.clip: unknown key"),
    (["rollout.n_samples=four"], "rollout.n_samples"),
    (["rollout.n_samples=2.5"], "rollout.n_samples"),
    (["rollout.temperature=hot"], "rollout.temperature"),
    (["trainer.lr=fast"], "trainer.lr"),
    (["trainer.lr=0"], "trainer.lr: Input should be greater than 0"),
    (["trainer.betas=[0.9]"], "trainer.betas"),
    (["mode=fast"], "'sync' or 'async'"),
    (["algorithm.loss=ppo2"], "algorithm.loss"),
    (["algorithm.advantage=gae"], "algorithm.advantage"),
    (["algorithm.aggregation=mean"], "algorithm.aggregation"),
    (["algorithm.kl_estimator=k4"], "algorithm.kl_estimator"),
    (["mode=async", "max_staleness=-1"], "max_staleness: Input should be greater than or equal"),
    (["max_staleness=2"], "max_staleness must be 0 (got 2): set max_staleness=0 or mode=async"),
    (["rollout.partial=true"], "need max_staleness >= 1"),
    (["rollout.oversample=0.5"], "rollout.oversample"),
    (["rollout.top_p=0"], "rollout.top_p"),
    (["rollout.top_p=1.5"], "rollout.top_p"),
    (["rollout.n_samples=1"], "set rollout.n_samples >= 2"),
    (["rollout.prompts_per_step=0"], "rollout.prompts_per_step"),
    (["rollout.prompts_per_step=1", "rollout.n_samples=2", "trainer.minibatches=4"],
     "trainer.minibatches (4) exceeds the samples per batch"),
    (["trainer.warmup_steps=150"], "trainer.warmup_steps (150) must be below"),
    (["data.curriculum.low=0.8", "data.curriculum.high=0.2"],
     "data.curriculum.low (0.8) is above data.curriculum.high (0.2): no prompt could be kept; "
     "set low <= high"),
    (["data.curriculum.enabled=true"], "skips nothing: raise data.curriculum.low"),
    (["data.curriculum.high=1.5"], "data.curriculum.high"),
    (["data.curriculum.min_samples=0"], "data.curriculum.min_samples"),
    (["rollout.adaptive_samples.n_min=8", "rollout.adaptive_samples.n_max=4"],
     "rollout.adaptive_samples.n_min (8) is above n_max (4): set n_min <= n_max"),
    (["rollout.adaptive_samples.mode=brorl"], "rollout.adaptive_samples.mode"),
    (["rollout.adaptive_samples.n_min=1"], "rollout.adaptive_samples.n_min"),
    (["rollout.prompts_per_step=1", "rollout.n_samples=8", "trainer.minibatches=4",
      "rollout.adaptive_samples.mode=pass_rate", "rollout.adaptive_samples.n_min=2"],
     "trainer.minibatches (4) exceeds the samples per batch"),
    (["rollout.max_new_tokens=128"], "leaves no room for the prompt"),
    (["model.tiny.num_heads=3"], "num_heads (3) must divide hidden_size (128)"),
    (["model.tiny.num_kv_heads=3"], "num_kv_heads (3) must divide num_heads (4)"),
    (["run.num_cpus=1", "rollout.num_workers=2"], "raise run.num_cpus"),
    (["run.steps=0"], "run.steps"),
    (["data.eval_size=0"], "data.eval_size"),
    (["metrics.port=70000"], "metrics.port"),
    (["sync.backend=mpi"], "sync.backend"),
    (["reward.type=remote"], "needs address: set reward.address=HOST:PORT"),
    (["reward.address=127.0.0.1:1"], "set reward.type=remote or drop reward.address"),
    (["reward.on_failure=ignore"], "reward.on_failure"),
    (["reward.failure_value=nan"], "reward.failure_value"),
    (["reward.timeout_s=0"], "reward.timeout_s"),
    (["trainer.tensor_parallel_size=2"], "needs trainer.backend=megatron"),
    (["rollout.engine=sglang"], "rollout.engine"),
    (["rollout.n_samples"], "section.field=value"),
    (["run.steps.max=3"], "run.steps: Input should be a valid integer"),
    (["rollout.placement=spread"], "rollout.placement: Input should be 'PACK', 'SPREAD'"),
    (["algorithm.expert_token_weighting=phi"],
     "algorithm.expert_token_weighting: Input should be 'none' or 'p_one_minus_p'"),
    (["algorithm.expert_coef=1.5"], "algorithm.expert_coef: Input should be less than or equal"),
    (["data.expert_field=answer", "trainer.backend=megatron",
      "trainer.pipeline_parallel_size=2"],
     "not supported with trainer.pipeline_parallel_size > 1 yet"),
    (["reward.num_workers=0", "reward.placement=PACK"],
     "with 0 the reward runs in the driver: drop reward.placement"),
    (["reward.num_cpus=0", "reward.placement=SPREAD"], "set reward.num_cpus > 0"),
    (["reward.num_workers=0", "reward.num_gpus=1"], "set reward.num_workers ≥ 1"),
    (["run.placement_timeout_s=0"], "run.placement_timeout_s"),
    (["rollout.max_turns=0"], "rollout.max_turns: Input should be greater than or equal to 1"),
    (["rollout.max_turn_tokens=0"], "rollout.max_turn_tokens"),
]


@pytest.mark.parametrize("overrides, message", BAD_CONFIGS,
                         ids=[" ".join(o) for o, _ in BAD_CONFIGS])
def test_a_bad_config_fails_with_a_message_naming_the_field_and_fix(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert message in str(info.value)


def test_the_config_corpus_holds_at_least_thirty_cases():
    assert len(BAD_CONFIGS) + len(BAD_FILE_CONFIGS) + len(BAD_PREPARE) >= 30


BAD_FILE_CONFIGS = [
    ("rollout: [1, 2\n", "is not valid YAML"),
    ("- 1\n- 2\n", "must hold a mapping of sections"),
    ("rollout:\n  n_samples: 4\n  n_sample: 4\n", "rollout.n_sample: unknown key"),
    ("data: sort\n", "data"),
]


@pytest.mark.parametrize("text, message", BAD_FILE_CONFIGS)
def test_a_bad_config_file_fails_with_a_message(tmp_path, text, message):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path, [])
    assert message in str(info.value)


# Errors found while the driver resolves the job (before any actor starts).
BAD_PREPARE = [
    (["data.task=chess"], "data.task: unknown task 'chess'; known:"),
    (["data.task_kwargs={digits: 5}"], "data.task_kwargs:"),
    (["reward.fn=nosuch"], "reward.fn: unknown name 'nosuch'. Use one of:"),
    (["reward.fn=nosuch_mod:score"], "reward.fn: cannot import module 'nosuch_mod'"),
    (["reward.fn=tests.plugins.broken_import:score"],
     "reward.fn: cannot import module 'tests.plugins.broken_import'"),
    (["reward.fn=tests.plugins.rewards:missing"], "has no attribute 'missing'"),
    (["reward.fn=tests.plugins.rewards:three_args"], "must take exactly (prompt, response)"),
    (["reward.fn=tests.plugins.rewards:NOT_CALLABLE"], "is not callable"),
    (["reward.fn=exact_match", "reward.kwargs={bogus: 1}"], "reward.kwargs"),
    (["reward.type=remote", "reward.address=127.0.0.1:1", "reward.token_env=ASYNCRL_UNSET_VAR"],
     "reward.token_env: environment variable 'ASYNCRL_UNSET_VAR' is not set"),
    (["model.path=/nonexistent/model"], "model.path: '/nonexistent/model' is not an HF model"),
    (["data.train_file=/nonexistent.jsonl"], "data.train_file: '/nonexistent.jsonl' does not"),
    (["data.expert_field=worked"],
     "data.expert_field: the task has no expert response in 'worked'"),
    (["rollout.workflow=chess"], "rollout.workflow: unknown name 'chess'. Use one of:"),
    (["rollout.workflow=nosuch_mod:make"], "rollout.workflow: cannot import module 'nosuch_mod'"),
    (["rollout.workflow=tests.plugins.workflows:no_step"], "without a step() taking 2"),
    (["rollout.workflow=python_tool", "rollout.workflow_kwargs={timeout: 1}"],
     "rollout.workflow_kwargs: 'python_tool' rejected"),
    (["rollout.workflow_kwargs={timeout_s: 1}"],
     "rollout.workflow_kwargs is set but rollout.workflow is not"),
    (["rollout.workflow=guess_number"],
     "rollout.workflow: 'guess_number' cannot start an episode on a data.task 'sort_digits'"),
    (["rollout.workflow=tests.plugins.workflows:NeedsAnswer"], "needs metadata['board']"),
]


@pytest.mark.parametrize("overrides, message", BAD_PREPARE,
                         ids=[" ".join(o) for o, _ in BAD_PREPARE])
def test_a_job_that_cannot_be_resolved_fails_in_the_driver(tmp_path, overrides, message):
    config = load_config(None, [f"run.output_dir={tmp_path}", "model.warm_start.steps=0",
                                *overrides])
    with pytest.raises(AsyncrlError) as info:
        prepare(config)
    assert message in str(info.value)


# (lines of a JSONL train file, the message naming file:line and what to do)
BAD_DATASETS = [
    ([b'{"prompt": "sort:1=", "answer": "1"', b""], "data.jsonl:1: not valid JSON"),
    ([b'{"prompt": "sort:1=", "answer": "1"}', b'["a", "b"]'],
     "data.jsonl:2: expected a JSON object, got list"),
    ([b"null"], "data.jsonl:1: expected a JSON object, got NoneType"),
    ([b'{"question": "sort:1="}'], "data.jsonl:1: no non-empty string under 'prompt'"),
    ([b'{"prompt": ""}'], "data.jsonl:1: no non-empty string under 'prompt'"),
    ([b'{"prompt": "   "}'], "data.jsonl:1: no non-empty string under 'prompt'"),
    ([b'{"prompt": 7}'], "data.jsonl:1: no non-empty string under 'prompt'"),
    ([b'{"prompt": "sort:1=", "answer": {"x": 1}}'], "data.jsonl:1: the answer under 'answer' is"),
    ([b"", b"  "], "has no prompts"),
    ([b'{"prompt": "sort:1=", "answer": "1"}', b'{"prompt": "caf\xe9"}'],
     "data.jsonl:2: not UTF-8 text"),
    ([b'{"prompt": "sort:1=\xce\xa9", "answer": "1"}'], "data.jsonl:1: the model's tokenizer "
                                                          "cannot represent '\u03a9'"),
    ([json.dumps({"prompt": "sort:" + "1" * 200 + "=", "answer": "1"}).encode()],
     "data.jsonl:1: the prompt has 206 tokens"),
    ([b'{"prompt": "sort:21="}'], "data.jsonl:1: no answer, and it is scored against one"),
    ([b'{"prompt": "sort:21=", "answer": "12", "max_new_tokens": "8"}'],
     "data.jsonl:1: max_new_tokens must be a non-negative integer"),
    ([b'{"prompt": "sort:21=", "answer": "12", "max_new_tokens": 4, "min_new_tokens": 6}'],
     "data.jsonl:1: need 0 <= min_new_tokens <= max_new_tokens"),
    ([b'{"prompt": "sort:21=", "answer": "12", "max_new_tokens": 500}'],
     "data.jsonl:1: max_new_tokens=500 leaves no room for the prompt"),
]


@pytest.mark.parametrize("lines, message", BAD_DATASETS)
def test_a_bad_dataset_fails_with_its_file_and_line(tmp_path, lines, message):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    config = load_config(None, [f"run.output_dir={tmp_path}", "model.warm_start.steps=0",
                                f"data.train_file={path}"])
    with pytest.raises(ConfigError) as info:
        prepare(config)
    assert str(info.value).startswith("data.train_file: ") and message in str(info.value)


def test_a_directory_or_missing_eval_file_is_named(tmp_path):
    for path, message in [(tmp_path, "is a directory"), (tmp_path / "no.jsonl", "does not exist")]:
        config = load_config(None, [f"run.output_dir={tmp_path}", f"data.eval_file={path}"])
        with pytest.raises(ConfigError, match=f"data.eval_file: .* {message}"):
            prepare(config)


def test_a_prompt_may_carry_its_own_generation_budget(tmp_path):
    from asyncrl.controller.pools import new_samples

    path = tmp_path / "data.jsonl"
    rows = [{"prompt": "sort:21=", "answer": "12", "max_new_tokens": 6, "min_new_tokens": 6},
            {"prompt": "sort:3=", "answer": "3"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ctx = prepare(load_config(None, [f"run.output_dir={tmp_path}", "model.warm_start.steps=0",
                                     f"data.train_file={path}"]))
    budgets = {p.text: [(s.max_new_tokens, s.min_new_tokens) for s in new_samples(p, 2, 8)]
               for p in ctx.train_prompts.take(2)}
    assert budgets == {"sort:21=": [(6, 6)] * 2, "sort:3=": [(8, 0)] * 2}
