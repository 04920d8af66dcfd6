"""What the benchmark scripts share: run a job in this process and read its metrics.jsonl.

Each script starts one Ray cluster and runs every variant on it, one after the other, so the
variants share the machine's state and the ratios between them mean something on a noisy box.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path
from typing import Any

from asyncrl.config import load_config
from asyncrl.controller.run import RunResult, run
from asyncrl.metrics.report import read_metrics


def job_parser(doc: str, name: str, steps: int) -> argparse.ArgumentParser:
    """The options every job benchmark takes: steps, `--set` overrides, JSON and run output."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="a job config override, key=value (repeatable)")
    parser.add_argument("--out", default=f"benchmarks/results/{name}.json")
    parser.add_argument("--output-dir", default="runs/bench", help="where the runs go")
    return parser


def run_job(overrides: list[str]) -> tuple[RunResult, list[dict[str, Any]], float]:
    """Run one job (quietly) with these `--set` overrides; its result, metrics rows, seconds."""
    config = load_config(None, overrides)
    start = time.perf_counter()
    result = run(config, progress=False)
    seconds = time.perf_counter() - start
    return result, read_metrics(result.run_dir / "metrics.jsonl"), seconds


def step_rows(rows: list[dict[str, Any]], skip: int = 0) -> list[dict[str, Any]]:
    """The training-step rows after the first `skip` (warm-up: the first batch of every mode
    starts from an empty pipeline)."""
    return [r for r in rows if "time/step_s" in r][skip:]


def loop_seconds(steps: list[dict[str, Any]]) -> float:
    """Wall-clock of these steps, without the evaluations some of them ran."""
    return sum(r["time/step_s"] - r.get("time/eval_s", 0.0) for r in steps)


def machine() -> dict[str, Any]:
    import os

    import torch
    return {"date": date.today().isoformat(), "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "torch": torch.__version__}


def write_json(path: str, report: dict[str, Any]) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), **report}, indent=2))
    print(f"wrote {out}")


def print_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> None:
    """columns: (header, key, format spec)."""
    widths = [max(len(h), 10) for h, _, _ in columns]
    print("  ".join(h.rjust(w) for (h, _, _), w in zip(columns, widths, strict=True)))
    for row in rows:
        cells = [format(row[key], spec) if not isinstance(row[key], str) else row[key]
                 for _, key, spec in columns]
        print("  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)))
