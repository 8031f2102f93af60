"""Metrics writer: one JSON line per record in `RUN_DIR/metrics.jsonl`, mirrored to wandb.

wandb runs offline (files under `RUN_DIR/wandb`) unless the user names a project *and* has not
set WANDB_MODE, so nothing leaves the machine by default. Each record is flushed as it is
written, so a killed run keeps every step it logged; on resume the writer appends, dropping
records past the resumed step (they belong to steps that will be recomputed).
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Mapping

import numpy as np


def _to_json_scalar(value: Any) -> Any:
    """jax/numpy scalars -> Python numbers; NaN/inf -> None (JSON has no NaN)."""
    if hasattr(value, "item") and np.ndim(value) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_metrics(run_dir: str) -> list[dict]:
    """All records of `RUN_DIR/metrics.jsonl` (a torn last line from a kill is skipped)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    records = []
    if not os.path.exists(path):
        return records
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


class MetricsWriter:
    """Appends `{"step": int, "time": unix_seconds, **metrics}` lines; optional wandb mirror.

    Metrics names use prefixes for groups: "train/loss", "eval/test_accuracy", ...
    """

    def __init__(self, run_dir: str, *, config: Mapping | None = None, use_wandb: bool = True,
                 wandb_project: str = "", run_name: str = "", resume_from_step: int | None = None):
        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(run_dir, "metrics.jsonl")
        if resume_from_step is not None:
            self._truncate_after(resume_from_step)
        self._file = open(self.path, "a")
        self._wandb_run = None
        if use_wandb:
            self._wandb_run = self._start_wandb(run_dir, config, wandb_project, run_name)

    def _truncate_after(self, step: int) -> None:
        kept = [r for r in read_metrics(os.path.dirname(self.path)) if r.get("step", 0) <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            for record in kept:
                f.write(json.dumps(record) + "\n")
        os.replace(tmp, self.path)

    @staticmethod
    def _start_wandb(run_dir, config, project, run_name):
        import wandb  # imported lazily: it is slow to import and optional for library users
        if not project:
            os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_SILENT", "true")
        return wandb.init(project=project or "jaxrl_vl", name=run_name or os.path.basename(run_dir),
                          dir=run_dir, config=dict(config or {}), resume="allow",
                          id=_stable_wandb_id(run_dir), reinit="finish_previous")

    def write(self, step: int, metrics: Mapping[str, Any]) -> dict:
        record = {"step": int(step), "time": time.time()}
        record.update({k: _to_json_scalar(v) for k, v in metrics.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._wandb_run is not None:
            self._wandb_run.log({k: v for k, v in record.items()
                                 if k not in ("step", "time") and isinstance(v, (int, float))},
                                step=int(step))
        return record

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _stable_wandb_id(run_dir: str) -> str:
    """The same run dir resumes the same wandb run."""
    import hashlib
    return hashlib.sha1(os.path.abspath(run_dir).encode()).hexdigest()[:16]
