#!/usr/bin/env python
"""Every kernel of a traced step next to what the optimized HLO says it is: bytes it moves, the bandwidth
that implies, and the model source line it came from. Shows which fusions sit near HBM bandwidth (nothing
left but fusing them away) and which do not (worth a look).

    XLA_FLAGS="--xla_dump_to=DUMP --xla_dump_hlo_module_re=jit_step --xla_dump_hlo_pass_re=NONE" \\
        python tools/bench_train.py ... --profile TRACE
    python tools/kernel_table.py DUMP/*jit_step*after_optimizations.txt TRACE [--steps 2] [--top 150]

Bytes are the HLO instruction's operands plus its result (an upper bound: a fusion may read only part of an
operand, or a broadcast of it, so a figure above the card's bandwidth means a partial read). Matmuls that
cuBLAS runs appear under their kernel names with no HLO details (their launches carry none).
"""
from __future__ import annotations

import argparse
import collections
import json
import re

import profile_summary

DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
               "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
SHAPE = re.compile(r"\b(" + "|".join(DTYPE_BYTES) + r")\[([0-9,]*)\]")
INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*?) ([\w\-]+)\((.*)$")
COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")


def nbytes(shape_text: str) -> int:
    """Bytes of every array shape written in shape_text (tuples add up)."""
    total = 0
    for dtype, dims in SHAPE.findall(shape_text):
        count = 1
        for dim in filter(None, dims.split(",")):
            count *= int(dim)
        total += count * DTYPE_BYTES[dtype]
    return total


def parse_hlo(text: str) -> tuple[dict, dict, dict]:
    """-> (shape text by instruction name, fusion/custom-call details by name, op lines by computation)."""
    shapes, launches, computations, current = {}, {}, {}, None
    for line in text.splitlines():
        header = COMPUTATION.match(line)
        if header and not line.startswith(" "):
            current = header.group(1)
            computations[current] = []
            continue
        if current:
            computations[current].append(line)
        m = INSTRUCTION.match(line)
        if not m:
            continue
        name, shape, op, rest = m.groups()
        shapes[name] = shape
        if op in ("fusion", "custom-call"):
            calls = re.search(r"calls=%?([\w.\-]+)", rest)
            op_name = re.search(r'op_name="([^"]*)"', rest)
            frame = re.search(r"stack_frame_id=(\d+)", rest)
            launches[name] = {"shape": shape, "operands": re.findall(r"%([\w.\-]+)", rest.split("), ")[0]),
                              "calls": calls.group(1) if calls else "",
                              "op_name": op_name.group(1) if op_name else "",
                              "frame": int(frame.group(1)) if frame else 0}
    return shapes, launches, computations


class SourceLines:
    """The model source lines of a stack_frame_id, from the HLO text's FileNames/.../StackFrames tables."""

    def __init__(self, text: str):
        def table(section):
            m = re.search(r"^" + section + r"\n((?:\d+ .*\n)+)", text, re.M)
            return {int(l.split(" ", 1)[0]): l.split(" ", 1)[1] for l in m.group(1).splitlines()} if m else {}
        self.files, self.functions = table("FileNames"), table("FunctionNames")
        self.locations, self.frames = table("FileLocations"), table("StackFrames")

    def __call__(self, frame_id: int, depth: int = 4, skip=("bench_train.py", "api.py", "traceback_util.py")) -> str:
        out = []
        while frame_id in self.frames and len(out) < depth:
            frame = self.frames[frame_id]
            location = self.locations.get(int(re.search(r"file_location_id=(\d+)", frame).group(1)), "")
            m = re.search(r"file_name_id=(\d+) function_name_id=(\d+) line=(\d+)", location)
            if m:
                file = self.files.get(int(m.group(1)), "").strip('"').rsplit("/", 1)[-1]
                if file not in skip:
                    out.append(f"{file}:{m.group(3)}:{self.functions.get(int(m.group(2)), '').strip(chr(34))}")
            # the printed parent id is one more than the parent's row (0: none); parents come first
            parent = int(re.search(r"parent_frame_id=(\d+)", frame).group(1)) - 1
            frame_id = parent if 0 < parent < frame_id else 0
        return " < ".join(out)


def hlo_name(kernel: str, launches: dict) -> str | None:
    """Trace kernel name (loop_add_fusion_134) -> HLO instruction name (loop_add_fusion.134)."""
    m = re.match(r"^(.*)_(\d+)$", kernel)
    for candidate in (kernel, m and f"{m.group(1)}.{m.group(2)}"):
        if candidate and candidate in launches:
            return candidate
    return None


def kernel_rows(hlo_text: str, trace_dir: str, steps: int) -> list[dict]:
    shapes, launches, computations = parse_hlo(hlo_text)
    source = SourceLines(hlo_text)
    rows = []
    for name, kind, ms, count, _ in profile_summary.summarize(trace_dir, steps=steps, top=1 << 30)["top"]:
        kernel = name.split(" [")[0]
        row = {"ms": ms, "count": count, "kind": kind, "kernel": kernel}
        found = hlo_name(kernel, launches)
        if found:
            launch = launches[found]
            moved = nbytes(launch["shape"]) + sum(nbytes(shapes.get(o, "")) for o in launch["operands"])
            per_call_s = ms / 1e3 / max(count, 1)
            body = [re.search(r"= \S+ ([\w\-]+)\(", line) for line in computations.get(launch["calls"], [])]
            row.update(mb=round(moved / 1e6), us=round(per_call_s * 1e6, 1),
                       gb_per_s=round(moved / per_call_s / 1e9) if per_call_s else 0,
                       shape=launch["shape"][:80], op_name=launch["op_name"][-100:], source=source(launch["frame"]),
                       ops=dict(collections.Counter(m.group(1) for m in body if m).most_common(8)))
        rows.append(row)
    return sorted(rows, key=lambda r: -r["ms"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("hlo", help="the *after_optimizations.txt HLO dump of the traced jit")
    p.add_argument("trace_dir")
    p.add_argument("--steps", type=int, default=2, help="steps in the trace (times are divided by it)")
    p.add_argument("--top", type=int, default=150)
    args = p.parse_args()
    with open(args.hlo) as f:
        rows = kernel_rows(f.read(), args.trace_dir, args.steps)
    totals = collections.defaultdict(float)
    for row in rows:
        totals[row["kind"]] += row["ms"]
    print("ms per step by kind:", json.dumps({k: round(v, 2) for k, v in totals.items()}))
    for r in rows[:args.top]:
        moved = f"{r['mb']}MB {r['us']}us {r['gb_per_s']}GB/s" if "mb" in r else ""
        print(f"{r['ms']:8.3f}ms x{r['count']:<4} {r['kind']:9} {r['kernel'][:48]:48} {moved:26} {r.get('shape', '')}")
        if "mb" in r:
            print(f"          {r['source'] or r['op_name']}\n          {r['ops']}")


if __name__ == "__main__":
    main()
