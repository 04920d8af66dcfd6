"""A run that mixes off-policy expert answers into RL (CHORD) from a JSONL field: every step
adds each trained prompt's expert answer, μ follows its schedule, the expert NLL falls, and the
ledger of generated samples is untouched by the expert rows."""

from __future__ import annotations

import json
import random

import pytest

from asyncrl.config import load_config
from asyncrl.controller.run import run
from asyncrl.data.tasks import SortDigits
from asyncrl.metrics.report import read_metrics

pytestmark = pytest.mark.timeout(300)
STEPS, GROUPS, N = 6, 4, 2


def test_expert_answers_from_a_jsonl_field_are_trained_by_the_sft_term(ray_local, tmp_path):
    task, rng = SortDigits(), random.Random(0)
    rows = [task.example(rng) for _ in range(24)]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"prompt": r.prompt, "answer": r.answer,
                                         "worked": r.answer}) + "\n" for r in rows))
    config = load_config(None, [
        f"run.output_dir={tmp_path}", "run.name=expert", f"run.steps={STEPS}",
        f"run.eval_every={STEPS}", f"data.train_file={train}", "data.eval_size=8",
        "data.expert_field=worked", "algorithm.expert_coef=0.9",
        "algorithm.expert_coef_end=0.4", "algorithm.expert_schedule=linear",
        "algorithm.expert_token_weighting=p_one_minus_p", "trainer.lr=0.003",
        "model.warm_start.steps=0", f"rollout.prompts_per_step={GROUPS}",
        f"rollout.n_samples={N}", "trainer.num_cpus=0.5",
    ])
    result = run(config, progress=False)
    steps = [r for r in read_metrics(result.run_dir / "metrics.jsonl") if "time/step_s" in r]
    assert [r["expert/samples"] for r in steps] == [GROUPS] * STEPS
    coefs = [r["expert/coef"] for r in steps]
    assert coefs[0] == pytest.approx(0.9) and coefs[-1] == pytest.approx(0.4)
    assert coefs == sorted(coefs, reverse=True)
    nll = [r["train/expert_nll"] for r in steps]
    assert nll[-1] < 0.8 * nll[0], nll  # imitation works: the expert answers got likelier
    # expert rows are not generated samples: the ledger counts only the policy's
    assert result.ledger["balance"] == 0 and result.ledger["trained"] == STEPS * GROUPS * N
