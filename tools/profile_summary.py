#!/usr/bin/env python
"""Where a traced step's device time goes: reads the .xplane.pb that `jax.profiler.trace` wrote and
prints the busiest device ops, grouped by kind (matmuls, attention, collectives, fusions, copies).

    python tools/profile_summary.py TRACE_DIR [--steps N] [--top 40]

Used by `tools/bench_train.py --profile DIR`. Reads the trace with jax.profiler.ProfileData, so it
needs nothing beyond jax (no TensorBoard / xprof). Times are per traced step (divided by --steps).
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re

# First match wins; names are kernel names (streams) or HLO op names ("XLA Ops" line).
KINDS = (
    ("attention", re.compile(r"cudnn|flash|fmha|sdpa|attention", re.I)),
    ("collective", re.compile(r"nccl|all-gather|all-reduce|reduce-scatter|all-to-all|collective", re.I)),
    ("matmul", re.compile(r"gemm|cublas|cutlass|matmul|dot|sm90_xmma|nvjet|triton_gemm", re.I)),
    ("copy/transpose", re.compile(r"copy|transpose|memcpy|memset|dynamic-update-slice|dynamic-slice", re.I)),
    ("fusion", re.compile(r"fusion|loop_|input_|triton", re.I)),
)


def kind_of(name: str, category: str = "") -> str:
    for kind, pattern in KINDS:
        if pattern.search(category) or pattern.search(name):
            return kind
    return "other"


def _trace_file(trace_dir: str) -> str:
    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    if not files:
        raise FileNotFoundError(f"no *.xplane.pb under {trace_dir}: was it written by jax.profiler.trace?")
    return files[-1]


def summarize(trace_dir: str, steps: int = 1, top: int = 40) -> dict:
    """{device, lines: {line: busy ms/step}, kinds: {kind: ms/step}, top: [(name, kind, ms/step, count)]}"""
    from jax.profiler import ProfileData

    data = ProfileData.from_file(_trace_file(trace_dir))
    # A GPU/TPU trace has one plane per device; a CPU trace only the host's threads.
    planes = [p for p in data.planes if p.name.startswith("/device:")] or \
        [p for p in data.planes if p.name == "/host:CPU"]
    if not planes:
        raise ValueError(f"no device plane in the trace under {trace_dir} (planes: {[p.name for p in data.planes]})")
    plane = planes[0]
    lines = {line.name: list(line.events) for line in plane.lines}
    busy = {name: sum(e.duration_ns for e in events) / 1e6 / steps for name, events in lines.items()}
    # Op-level view when the trace has it, else every stream's kernels.
    op_lines = ([name for name in lines if name == "XLA Ops"] or [n for n in lines if n.startswith("Stream")]
                or list(lines))
    by_name: dict[str, list] = collections.defaultdict(lambda: [0.0, 0, ""])
    sample_stats = {}
    for name in op_lines:
        for event in lines[name]:
            stats = dict(event.stats)
            sample_stats = sample_stats or {k: str(v)[:120] for k, v in stats.items()}
            # Kernels carry the HLO op that launched them (unless inside a CUDA graph / command buffer:
            # XLA_FLAGS=--xla_gpu_enable_command_buffer= keeps them apart).
            hlo_op = str(stats.get("hlo_op", ""))
            key = event.name if not hlo_op or hlo_op.startswith("command_buffer") else f"{hlo_op} [{event.name[:60]}]"
            entry = by_name[key]
            entry[0] += event.duration_ns / 1e6 / steps
            entry[1] += 1
            entry[2] = entry[2] or str(stats.get("hlo_category", "") or stats.get("long_name", ""))[:200]
    kinds: dict[str, float] = collections.defaultdict(float)
    rows = []
    for name, (ms, count, detail) in by_name.items():
        kind = kind_of(name, detail)
        kinds[kind] += ms
        rows.append((name, kind, round(ms, 3), count // steps, detail))
    rows.sort(key=lambda r: -r[2])
    # Fusions come as many small kernels (loop_multiply_fusion_12, ...): their families without the numbers
    families: dict[str, float] = collections.defaultdict(float)
    for name, kind, ms, _, _ in rows:
        if kind == "fusion":
            families[re.sub(r"[._]\d+", "", name.split(" [")[0])] += ms
    families = dict(sorted(((k, round(v, 2)) for k, v in families.items()), key=lambda kv: -kv[1])[:top])
    idle = _idle_time(lines, busy, steps, top)
    return {"device": plane.name, "op_lines": op_lines, "lines_ms_per_step": {k: round(v, 2) for k, v in busy.items()},
            "kinds_ms_per_step": {k: round(v, 2) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
            "fusion_families_ms_per_step": families, **idle, "top": rows[:top], "event_stats_example": sample_stats}


def _idle_time(lines: dict, busy: dict, steps: int, top: int) -> dict:
    """Time the busiest stream sits idle between its kernels (launch gaps, host waits), per step, and
    the kernels those gaps follow most: the part of a step that no kernel speed-up can recover."""
    streams = [name for name in lines if name.startswith("Stream")] or list(lines)
    name = max(streams, key=lambda n: busy.get(n, 0.0), default=None)
    events = sorted(lines.get(name, []), key=lambda e: e.start_ns) if name else []
    if len(events) < 2:
        return {}
    after: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
    gaps_ns = 0.0
    end = events[0].start_ns + events[0].duration_ns
    previous = events[0].name
    for event in events[1:]:
        gap = event.start_ns - end
        if gap > 0:
            gaps_ns += gap
            entry = after[re.sub(r"[._]\d+$", "", previous)[:80]]
            entry[0] += gap / 1e6 / steps
            entry[1] += 1
        if event.start_ns + event.duration_ns >= end:
            end, previous = event.start_ns + event.duration_ns, event.name
    worst = sorted(after.items(), key=lambda kv: -kv[1][0])[:min(top, 15)]
    return {"idle_stream": name, "idle_ms_per_step": round(gaps_ns / 1e6 / steps, 2),
            "idle_after_ms_per_step": [(k, round(v[0], 3), v[1] // steps) for k, v in worst]}


def format_table(summary: dict) -> str:
    out = [f"device {summary['device']}; busy ms/step by line: {json.dumps(summary['lines_ms_per_step'])}",
           f"by kind (ms/step): {json.dumps(summary['kinds_ms_per_step'])}",
           f"fusion families (ms/step): {json.dumps(summary.get('fusion_families_ms_per_step', {}))}",
           f"idle between kernels on {summary.get('idle_stream')}: {summary.get('idle_ms_per_step')} ms/step; "
           f"most after: {json.dumps(summary.get('idle_after_ms_per_step', [])[:8])}",
           "top ops (ms/step, count/step):"]
    for name, kind, ms, count, detail in summary["top"]:
        out.append(f"  {ms:9.3f} {count:5d} {kind:15s} {name[:90]}  {detail[:120]}")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("trace_dir")
    p.add_argument("--steps", type=int, default=1, help="steps in the trace (times are divided by it)")
    p.add_argument("--top", type=int, default=40)
    args = p.parse_args()
    summary = summarize(args.trace_dir, args.steps, args.top)
    print(format_table(summary))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
