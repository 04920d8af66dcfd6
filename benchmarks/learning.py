"""Sync vs async on the built-in example: wall-clock and final held-out accuracy, same run.

    python benchmarks/async_vs_sync.py [--steps N] [--set key=value ...] [--out FILE]

Runs `asyncrl.run` twice on one embedded Ray cluster, identical but for `mode` (async uses the
default η = 1), and prints both and the ratio sync / async of the training loop's wall-clock
(first to last row of metrics.jsonl: the steps and evaluations; model build, warm start and actor
start-up are the same for both modes and reported apart as total seconds). Writes JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import ray

from asyncrl.config import load_config
from asyncrl.controller.run import run
from asyncrl.metrics.report import read_metrics


def measure(mode: str, overrides: list[str], output_dir: str) -> dict:
    config = load_config(None, [f"mode={mode}", f"run.name=bench-{mode}",
                                f"run.output_dir={output_dir}", *overrides])
    start = time.perf_counter()
    result = run(config, progress=False)
    total = time.perf_counter() - start
    rows = read_metrics(result.run_dir / "metrics.jsonl")
    steps = [r for r in rows if "time/step_s" in r]
    return {
        "mode": mode, "max_staleness": config.max_staleness,
        "loop_seconds": round(rows[-1]["time_s"] - rows[0]["time_s"], 1),
        "total_seconds": round(total, 1),
        "first_accuracy": result.evals[0][1], "final_accuracy": result.evals[-1][1],
        "max_staleness_seen": max(r["staleness/max"] for r in steps),
        "trainer_wait_fraction": round(sum(r["time/wait_batch_s"] for r in steps)
                                       / sum(r["time/step_s"] for r in steps), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", default="benchmarks/results/async_vs_sync.json")
    parser.add_argument("--output-dir", default="runs/bench")
    args = parser.parse_args()
    overrides = args.overrides + ([f"run.steps={args.steps}"] if args.steps else [])
    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        rows = [measure(mode, overrides, args.output_dir) for mode in ("sync", "async")]
    finally:
        ray.shutdown()
    sync, async_ = rows
    gap = 100 * (async_["final_accuracy"] - sync["final_accuracy"])
    report = {"rows": rows, "accuracy_gap_points": round(gap, 1),
              "speedup_async_over_sync": round(sync["loop_seconds"] / async_["loop_seconds"], 3)}
    print(f"{'mode':6} {'η':>2} {'loop s':>7} {'total s':>8} {'first acc':>10} "
          f"{'final acc':>10} {'max stale':>9} {'trainer wait':>12}")
    for r in rows:
        print(f"{r['mode']:6} {r['max_staleness']:>2} {r['loop_seconds']:>7} "
              f"{r['total_seconds']:>8} {r['first_accuracy']:>10.1%} "
              f"{r['final_accuracy']:>10.1%} {r['max_staleness_seen']:>9} "
              f"{r['trainer_wait_fraction']:>12.1%}")
    print(f"speed-up async/sync: {report['speedup_async_over_sync']}x, "
          f"accuracy gap: {report['accuracy_gap_points']:+} points")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
