"""Throughput on a long-tail load: sync vs async vs async + partial rollouts (APRIL), same run.

    python benchmarks/throughput.py [--steps N] [--workers W] [--median M] [--sigma S]
                                    [--cap C] [--set key=value ...] [--out FILE]

The workload: sort-digit prompts, each with a response length drawn from a lognormal (median M,
shape S, capped at C tokens) and forced with min_new_tokens = max_new_tokens, so a few answers
in every batch are many times longer than the median (the long tail of reasoning RL). The same
prompts (a JSONL file written here), workers, batch shape and steps run in three modes:

- sync: generate a batch, train it, broadcast, repeat (η = 0);
- async: rollouts continue while the trainer trains (η = --max-staleness, 1 by default), no
  over-provisioning;
- async+partial: the same η, 2× over-provisioned, and once a batch is full the in-flight answers
  are aborted and resumed later from their tokens (APRIL).

Reported per mode, over the steps after the first (which starts from an empty pipeline):
trained samples/s and tokens/s, generated tokens/s, the trainer's idle share (waiting for a
batch), the rollout pool's idle share (no request in flight), mean / max staleness of trained
samples, samples dropped, and each rate as a ratio against sync. The model learns nothing here
(random init, no warm start, forced lengths): only the system's speed is measured.
"""

from __future__ import annotations

import json
import math
import random
import tempfile
from pathlib import Path

import ray
from harness import job_parser, loop_seconds, print_table, run_job, step_rows, write_json

from asyncrl.data.tasks import TASKS

MODES = {
    "sync": ["mode=sync"],
    "async": ["mode=async"],
    "async+partial": ["mode=async", "rollout.partial=true", "rollout.oversample=2"],
}


def long_tail_lengths(count: int, *, median: float, sigma: float, cap: int,
                      seed: int) -> list[int]:
    rng = random.Random(seed)
    return [max(1, min(cap, round(rng.lognormvariate(math.log(median), sigma))))
            for _ in range(count)]


def write_prompts(path: Path, lengths: list[int], seed: int) -> None:
    task, rng = TASKS["sort_digits"](), random.Random(seed)
    with path.open("w") as f:
        for length in lengths:
            example = task.example(rng)
            f.write(json.dumps({"prompt": example.prompt, "answer": example.answer,
                                "min_new_tokens": length, "max_new_tokens": length}) + "\n")


def summarize(mode: str, rows: list[dict], batch_samples: int) -> dict:
    """Rates over the steps after the first; every batch holds exactly `batch_samples`."""
    steps = step_rows(rows, skip=1)
    seconds = loop_seconds(steps)
    last = steps[-1]
    return {
        "mode": mode,
        "steps": len(steps),
        "seconds": round(seconds, 2),
        "samples_per_s": len(steps) * batch_samples / seconds,
        "trained_tokens_per_s": sum(r["rollout/response_len"] for r in steps) * batch_samples
        / seconds,
        "generated_tokens_per_s": sum(r["rollout/step_tokens"] for r in steps) / seconds,
        "trainer_idle": sum(r["time/wait_batch_s"] for r in steps) / seconds,
        # busy/rollout is a share of the step's wait + train + sync (its own clock)
        "rollout_idle": 1 - sum(r["busy/rollout"] * (r["time/wait_batch_s"] + r["time/train_s"]
                                                     + r["time/sync_s"]) for r in steps) / seconds,
        "staleness_mean": sum(r["staleness/mean"] for r in steps) / len(steps),
        "staleness_max": max(r["staleness/max"] for r in steps),
        "dropped": sum(v for k, v in last.items() if k.startswith("data/dropped/")),
        "resumed": last["data/resumed"],
    }


def main() -> None:
    parser = job_parser(__doc__, "throughput", steps=12)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=16, help="groups per batch")
    parser.add_argument("--samples", type=int, default=4, help="answers per prompt")
    parser.add_argument("--median", type=float, default=12.0, help="median response tokens")
    parser.add_argument("--sigma", type=float, default=1.0, help="lognormal shape")
    parser.add_argument("--cap", type=int, default=160, help="longest response, in tokens")
    parser.add_argument("--max-staleness", type=int, default=1, help="η of the async modes")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="asyncrl-throughput-"))
    lengths = long_tail_lengths(4096, median=args.median, sigma=args.sigma, cap=args.cap, seed=0)
    write_prompts(work / "train.jsonl", lengths, seed=0)
    write_prompts(work / "eval.jsonl", [4] * 8, seed=1)  # evaluation is not measured: keep it short
    common = [
        f"run.steps={args.steps}", f"run.eval_every={args.steps}",
        f"run.output_dir={args.output_dir}",
        f"rollout.num_workers={args.workers}", f"rollout.prompts_per_step={args.prompts}",
        f"rollout.n_samples={args.samples}", f"rollout.max_new_tokens={args.cap}",
        f"model.tiny.max_position_embeddings={args.cap + 32}", "model.warm_start.steps=0",
        f"data.train_file={work / 'train.jsonl'}", f"data.eval_file={work / 'eval.jsonl'}",
        "data.eval_size=8",
    ]
    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        rows = []
        for mode in args.modes:
            eta = [] if mode == "sync" else [f"max_staleness={args.max_staleness}"]
            name = f"run.name=bench-throughput-{mode.replace('+', '-')}"
            _, metrics, _ = run_job([*common, *MODES[mode], *eta, name,
                                     *args.overrides])
            rows.append(summarize(mode, metrics, args.prompts * args.samples))
    finally:
        ray.shutdown()
    base = rows[0]
    for row in rows:
        for key in ("samples_per_s", "trained_tokens_per_s", "generated_tokens_per_s"):
            row[f"{key}_vs_{base['mode']}"] = row[key] / base[key]
    print(f"long tail: lognormal median {args.median:g}, sigma {args.sigma:g}, cap {args.cap} "
          f"tokens (mean {sum(lengths) / len(lengths):.1f}, p99 "
          f"{sorted(lengths)[int(0.99 * len(lengths))]})")
    print_table(rows, [
        ("mode", "mode", ""), ("steps", "steps", "d"), ("seconds", "seconds", ".1f"),
        ("samples/s", "samples_per_s", ".1f"), ("trained tok/s", "trained_tokens_per_s", ".0f"),
        ("gen tok/s", "generated_tokens_per_s", ".0f"),
        (f"× {base['mode']}", f"samples_per_s_vs_{base['mode']}", ".2f"),
        ("trainer idle", "trainer_idle", ".1%"), ("rollout idle", "rollout_idle", ".1%"),
        ("stale mean", "staleness_mean", ".2f"), ("stale max", "staleness_max", ".0f"),
        ("dropped", "dropped", ".0f"), ("resumed", "resumed", ".0f"),
    ])
    by_mode = {r["mode"]: r for r in rows}
    if "async" in by_mode and "async+partial" in by_mode:
        gain = by_mode["async+partial"]["samples_per_s"] / by_mode["async"]["samples_per_s"]
        print(f"partial over plain async: {gain:.2f}x")
    write_json(args.out, {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
