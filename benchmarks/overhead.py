"""System overhead: the share of a training step that is neither engine nor trainer compute.

    python benchmarks/overhead.py [--steps N] [--set key=value ...] [--out FILE]

Runs the built-in job in sync mode (generate → reward → train → sync, nothing overlaps, so the
step is the sum of its parts) and, per step after the first, takes

    overhead = step time − engine compute − trainer compute

where engine compute is the time the rollout engines spent in prefill, decode and sampling
(`time/engine_compute_s`, measured inside the engine) and trainer compute the time inside the
backend's training step (`time/trainer_compute_s`, measured inside the trainer actor). What is
left is the system: Ray calls, the DataManager, scoring, tokenizer decoding, the weight broadcast
and the driver's loop. Printed: the fraction overhead / step time (target ≤ 5 %) and where the
overhead goes.
"""

from __future__ import annotations

import ray
from harness import job_parser, loop_seconds, print_table, run_job, step_rows, write_json


def breakdown(rows: list[dict]) -> dict:
    """Per-step means, and the overhead split by where it happens: the rollout side (waiting
    for the batch beyond engine compute: requests, scoring, the DataManager), the trainer call
    beyond its compute (sending the batch, Ray), the weight sync, and the loop's own rest."""
    steps = step_rows(rows, skip=1)
    total = loop_seconds(steps)

    def part(key: str) -> float:
        return sum(r[key] for r in steps)

    engine, trainer = part("time/engine_compute_s"), part("time/trainer_compute_s")
    wait, train, sync = part("time/wait_batch_s"), part("time/train_s"), part("time/sync_s")
    return {
        "steps": len(steps), "step_s": total / len(steps),
        "engine_s": engine / len(steps), "trainer_s": trainer / len(steps),
        "overhead_s": (total - engine - trainer) / len(steps),
        "overhead_fraction": (total - engine - trainer) / total,
        "rollout_side": (wait - engine) / total, "trainer_call": (train - trainer) / total,
        "sync": sync / total, "loop_rest": (total - wait - train - sync) / total,
    }


def main() -> None:
    parser = job_parser(__doc__, "overhead", steps=40)
    args = parser.parse_args()
    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        _, rows, _ = run_job([
            "mode=sync", f"run.steps={args.steps}", f"run.eval_every={args.steps}",
            "run.name=bench-overhead", f"run.output_dir={args.output_dir}", *args.overrides])
    finally:
        ray.shutdown()
    result = breakdown(rows)
    print_table([result], [
        ("steps", "steps", "d"), ("step s", "step_s", ".3f"), ("engine s", "engine_s", ".3f"),
        ("trainer s", "trainer_s", ".3f"), ("overhead s", "overhead_s", ".3f"),
        ("overhead", "overhead_fraction", ".1%"), ("rollout side", "rollout_side", ".1%"),
        ("trainer call", "trainer_call", ".1%"), ("sync", "sync", ".1%"),
        ("loop rest", "loop_rest", ".1%"),
    ])
    print(f"overhead fraction: {result['overhead_fraction']:.1%} (target <= 5%)")
    write_json(args.out, {"args": vars(args), "result": result})


if __name__ == "__main__":
    main()
