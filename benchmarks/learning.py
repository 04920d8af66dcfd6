"""Learning vs wall-clock: sync and async on the built-in task, same run.

    python benchmarks/learning.py [--steps N] [--eval-every K] [--set key=value ...] [--out FILE]

Runs the built-in job twice on one embedded Ray cluster, identical but for `mode` (async uses
the default η = 1), evaluating held-out greedy accuracy every K steps. The clock is the training
loop's (steps only: evaluations, model build, warm start and actor start-up are the same for
both modes and left out). Printed per mode: loop seconds, first and final accuracy, the trainer's
wait share, and when (loop seconds) it first reached sync's final accuracy minus 2 points; then
async's time-to-target as a ratio of sync's (below 1: async gets there sooner). One evaluation
of 200 prompts has a standard error of about 3 points, so "final" is the mean of the last three
evaluations; --seeds repeats the pair and reports every ratio.
"""

from __future__ import annotations

import argparse

import ray
from harness import job_parser, print_table, run_job, step_rows, write_json

TARGET_MARGIN = 0.02  # async must reach sync's final accuracy within 2 points
FINAL_EVALS = 3  # "final accuracy": the mean of the last evaluations (one is noisy)


def curve(rows: list[dict]) -> list[tuple[float, float]]:
    """(loop seconds, held-out accuracy) at every evaluation, the clock without evaluations."""
    points, clock = [], 0.0
    for r in rows:
        if "time/step_s" in r:
            clock += r["time/step_s"] - r.get("time/eval_s", 0.0)
        if "eval/accuracy" in r:
            points.append((clock, r["eval/accuracy"]))
    return points


def time_to(points: list[tuple[float, float]], target: float) -> float | None:
    return next((t for t, acc in points if acc >= target), None)


def compare(seed: int, args: argparse.Namespace) -> dict:
    """One sync and one async run with this seed; their curves and the time-to-target ratio."""
    runs = {mode: run_job([f"mode={mode}", f"run.name=bench-learning-{mode}", f"run.seed={seed}",
                           f"run.steps={args.steps}", f"run.eval_every={args.eval_every}",
                           f"run.output_dir={args.output_dir}", *args.overrides])[1]
            for mode in ("sync", "async")}
    curves = {mode: curve(rows) for mode, rows in runs.items()}
    target = final(curves["sync"]) - TARGET_MARGIN
    table = []
    for mode, rows in runs.items():
        steps, points = step_rows(rows), curves[mode]
        table.append({
            "seed": seed, "mode": mode, "loop_seconds": points[-1][0],
            "first_accuracy": points[0][1], "final_accuracy": final(points),
            "time_to_target_s": time_to(points, target),
            "trainer_wait": sum(r["time/wait_batch_s"] for r in steps)
            / sum(r["time/step_s"] - r.get("time/eval_s", 0.0) for r in steps),
            "max_staleness": max(r["staleness/max"] for r in steps), "curve": points,
        })
    sync, async_ = (r["time_to_target_s"] for r in table)
    return {"seed": seed, "target": target, "rows": table,
            "time_to_target_ratio": None if async_ is None else async_ / sync}


def final(points: list[tuple[float, float]]) -> float:
    last = [acc for _, acc in points[-FINAL_EVALS:]]
    return sum(last) / len(last)


def main() -> None:
    parser = job_parser(__doc__, "learning", steps=150)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args()
    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        pairs = [compare(seed, args) for seed in args.seeds]
    finally:
        ray.shutdown()
    print_table([{**r, "time_to_target_s": r["time_to_target_s"] or float("nan")}
                 for pair in pairs for r in pair["rows"]], [
        ("seed", "seed", "d"), ("mode", "mode", ""), ("loop s", "loop_seconds", ".1f"),
        ("first acc", "first_accuracy", ".1%"), ("final acc", "final_accuracy", ".1%"),
        ("to target s", "time_to_target_s", ".1f"), ("trainer wait", "trainer_wait", ".1%"),
        ("max stale", "max_staleness", ".0f"),
    ])
    for pair in pairs:
        ratio = pair["time_to_target_ratio"]
        print(f"seed {pair['seed']}: target {pair['target']:.1%} (sync final − 2 points); "
              "async time-to-target / sync: "
              + (f"{ratio:.2f}" if ratio is not None else "never reached"))
    write_json(args.out, {"args": vars(args), "pairs": pairs})


if __name__ == "__main__":
    main()
