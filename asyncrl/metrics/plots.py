"""`asyncrl report RUN_DIR`: an HTML page with PNG plots of a run, from its metrics.jsonl.

Plots what the run recorded and skips what it did not (older runs, sync runs without partials),
so any run directory can be reported. matplotlib is imported here only (Agg backend, no display).
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asyncrl.errors import AsyncrlError
from asyncrl.metrics.report import read_metrics

REPORT_DIR = "report"


@dataclass(frozen=True)
class Panel:
    """One PNG: series (metrics.jsonl keys, or key prefixes ending in '/') against the step."""

    name: str
    title: str
    ylabel: str
    keys: Sequence[str]
    stacked: bool = False


PANELS = (
    Panel("reward", "Reward and accuracy of the sampled answers", "per batch",
          ("reward/mean", "reward/accuracy")),
    Panel("eval", "Held-out accuracy (greedy)", "exact match", ("eval/accuracy",)),
    Panel("throughput", "Generation throughput", "tokens / s", ("perf/tokens_per_s",)),
    Panel("staleness", "Staleness of trained tokens", "policy versions",
          ("staleness/mean", "staleness/max")),
    Panel("time", "Where each step's time went", "seconds",
          ("time/wait_batch_s", "time/train_s", "time/sync_s", "time/eval_s"), stacked=True),
    Panel("utilisation", "Pool utilisation", "busy fraction",
          ("busy/rollout", "busy/reward", "busy/trainer")),
    Panel("dropped", "Samples dropped, by rule (cumulative)", "samples", ("data/dropped/",)),
    Panel("reward_failures", "Reward failures, by reason (cumulative)", "samples",
          ("reward/failures/",)),
)


def write_report(run_dir: Path, out_dir: Path | None = None) -> Path:
    """Write out_dir/index.html (default RUN_DIR/report) and its PNGs; returns the HTML path."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise AsyncrlError(f"report: {str(run_dir)!r} has no metrics.jsonl; pass the run "
                           "directory `asyncrl train` printed")
    rows = read_metrics(metrics)
    if not rows:
        raise AsyncrlError(f"report: {metrics} is empty: the run wrote no step yet")
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.ticker import MaxNLocator

    out_dir = out_dir or run_dir / REPORT_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    images = []
    for panel in PANELS:
        series = _series(rows, panel.keys)
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(7, 3.6), dpi=100)
        if panel.stacked:
            steps = sorted({s for xs, _ in series.values() for s in xs})
            stacks = [[dict(zip(*series[k], strict=True)).get(s, 0.0) for s in steps]
                      for k in series]
            ax.stackplot(steps, stacks, labels=list(series), alpha=0.8)
        else:
            for label, (xs, ys) in series.items():
                ax.plot(xs, ys, label=label, marker="o" if len(xs) < 30 else None,
                        markersize=3, linewidth=1.5)
        ax.set_title(panel.title)
        ax.set_xlabel("training step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
        ax.set_ylabel(panel.ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
        fig.tight_layout()
        fig.savefig(out_dir / f"{panel.name}.png")
        plt.close(fig)
        images.append(panel)
    page = out_dir / "index.html"
    page.write_text(_html(run_dir, rows, images))
    return page


def _series(rows: list[dict[str, Any]], keys: Sequence[str]) -> dict[str, tuple[list, list]]:
    """key → (steps, values) for each key (prefix keys expand to every key under them)."""
    names = []
    for key in keys:
        found = sorted({k for r in rows for k in r if k.startswith(key)}) if key.endswith("/") \
            else [key]
        names += [n for n in found if n not in names]
    out = {}
    for name in names:
        points = [(r["step"], r[name]) for r in rows
                  if "step" in r and isinstance(r.get(name), int | float)
                  and not math.isnan(r[name])]
        if points:
            out[name] = ([p[0] for p in points], [p[1] for p in points])
    return out


def _html(run_dir: Path, rows: list[dict[str, Any]], images: list[Panel]) -> str:
    steps = [r for r in rows if "time/step_s" in r]
    evals = [r["eval/accuracy"] for r in rows if "eval/accuracy" in r]
    last = steps[-1] if steps else {}
    summary = {
        "steps": len(steps),
        "training-loop time": f"{sum(r['time/step_s'] for r in steps):.1f} s",
        "held-out accuracy, first → last": (f"{evals[0]:.1%} → {evals[-1]:.1%}" if evals
                                            else "n/a"),
        "samples trained": last.get("data/trained", "n/a"),
        "ledger balance (0 = every sample accounted for)": last.get("data/balance", "n/a"),
    }
    config = run_dir / "config.resolved.yaml"
    parts = [
        "<!doctype html><meta charset='utf-8'>",
        f"<title>asyncrl report: {html.escape(run_dir.name)}</title>",
        "<style>body{font-family:sans-serif;max-width:760px;margin:2em auto}"
        "td{padding:2px 12px}pre{background:#f4f4f4;padding:1em;overflow:auto}</style>",
        f"<h1>Run {html.escape(run_dir.name)}</h1><table>",
        *(f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>"
          for k, v in summary.items()),
        "</table>",
        *(f"<h2>{html.escape(p.title)}</h2><img src='{p.name}.png' alt='{p.name}'>"
          for p in images),
    ]
    if config.is_file():
        parts.append(f"<h2>Config</h2><pre>{html.escape(config.read_text())}</pre>")
    return "\n".join(parts) + "\n"
