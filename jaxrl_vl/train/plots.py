"""PNG curves from a run's metrics.jsonl (used by tools/plot_metrics.py and at the end of a run).

One PNG per metric group prefix ("train.png", "eval.png", ...), one panel per metric, x = step.
"""
from __future__ import annotations

import math
import os

import matplotlib

matplotlib.use("Agg")  # no display on servers / CI
import matplotlib.pyplot as plt  # noqa: E402

from jaxrl_vl.train.metrics import read_metrics  # noqa: E402

_SKIP = {"step", "time"}


def metric_series(records: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """{metric name: (steps, values)} for every numeric metric in the records."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for record in records:
        step = record.get("step")
        for key, value in record.items():
            if key in _SKIP or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if not math.isfinite(value):
                continue
            steps, values = series.setdefault(key, ([], []))
            steps.append(step)
            values.append(value)
    return series


def plot_run(run_dir: str, out_dir: str | None = None, keys: list[str] | None = None) -> list[str]:
    """Write PNG curves grouped by the metric prefix before "/"; returns the file paths."""
    records = read_metrics(run_dir)
    if not records:
        raise FileNotFoundError(f"no metrics in {os.path.join(run_dir, 'metrics.jsonl')} (is RUN_DIR a run directory?)")
    series = metric_series(records)
    if keys:
        missing = [k for k in keys if k not in series]
        if missing:
            raise KeyError(f"--keys {missing} not in metrics; available: {sorted(series)}")
        series = {k: series[k] for k in keys}
    groups: dict[str, list[str]] = {}
    for name in sorted(series):
        groups.setdefault(name.split("/", 1)[0] if "/" in name else "metrics", []).append(name)
    out_dir = out_dir or os.path.join(run_dir, "plots")
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for group, names in groups.items():
        cols = min(3, len(names))
        rows = math.ceil(len(names) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
        for ax, name in zip(axes.flat, names):
            steps, values = series[name]
            ax.plot(steps, values, marker="." if len(steps) < 50 else None)
            ax.set_title(name, fontsize=10)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(names):]:
            ax.axis("off")
        fig.suptitle(f"{os.path.basename(os.path.abspath(run_dir))}: {group}")
        fig.tight_layout()
        path = os.path.join(out_dir, f"{group.replace(os.sep, '_')}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def text_curve(run_dir: str, max_rows: int = 12) -> str:
    """A few-line text table of the run's curve for the terminal: train loss at up to max_rows
    evenly spaced steps, plus every eval record's numeric metrics."""
    records = read_metrics(run_dir)
    train = [r for r in records if isinstance(r.get("train/loss"), (int, float))]
    evals = [r for r in records if any(k.startswith("eval/") and isinstance(v, (int, float)) and not isinstance(v, bool)
                                       for k, v in r.items())]
    lines = []
    if train:
        stride = max(1, math.ceil(len(train) / max_rows))
        picked = train[::stride] + ([train[-1]] if (len(train) - 1) % stride else [])
        lines.append("train loss: " + "  ".join(f"{r['step']}:{r['train/loss']:.4f}" for r in picked))
    for r in evals:
        values = "  ".join(f"{k[5:]}={v:.4f}" for k, v in sorted(r.items())
                           if k.startswith("eval/") and isinstance(v, (int, float)) and not isinstance(v, bool))
        lines.append(f"eval @ step {r['step']}: {values}")
    return "\n".join(lines)
