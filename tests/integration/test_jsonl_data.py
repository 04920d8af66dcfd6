"""Training from JSONL prompt files through config alone."""

from __future__ import annotations

import json
import random

import pytest

from asyncrl.config import load_config
from asyncrl.controller.run import run
from asyncrl.data.tasks import SortDigits
from asyncrl.metrics.report import read_metrics

pytestmark = pytest.mark.timeout(300)


def _write(path, count: int, seed: int) -> str:
    task, rng = SortDigits(), random.Random(seed)
    rows = [task.example(rng) for _ in range(count)]
    path.write_text("".join(json.dumps({"question": r.prompt, "solution": r.answer}) + "\n"
                            for r in rows))
    return str(path)


def test_a_run_trains_on_prompts_from_jsonl_files(ray_local, tmp_path):
    config = load_config(None, [
        f"run.output_dir={tmp_path}", "run.name=files", "run.steps=3", "run.eval_every=3",
        f"data.train_file={_write(tmp_path / 'train.jsonl', 10, 0)}",
        f"data.eval_file={_write(tmp_path / 'eval.jsonl', 20, 1)}", "data.eval_size=8",
        "data.prompt_key=question", "data.answer_key=solution", "model.warm_start.steps=10",
        "rollout.prompts_per_step=4", "rollout.n_samples=4", "trainer.num_cpus=0.5",
    ])
    result = run(config, progress=False)
    assert [v for v, _ in result.evals] == [0, 3]
    assert result.ledger["balance"] == 0 and result.ledger["trained"] == 3 * 4 * 4
    rows = [r for r in read_metrics(result.run_dir / "metrics.jsonl") if "reward/mean" in r]
    assert len(rows) == 3 and all(0 <= r["reward/mean"] <= 1 for r in rows)
