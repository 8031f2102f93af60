"""Write an offline Geometry3k-style dataset: PNG diagrams plus parquet AND jsonl.

  python tools/make_geometry.py --n 200 --out DIR [--seed 0] [--split train]

Writes DIR/images/<id>.png, DIR/<split>.jsonl (images as relative paths) and DIR/<split>.parquet
(images as {"bytes", "path"} structs, the HF `hiyouga/geometry3k` layout), so
`jaxrl_vl.envs.geometry.loader.load_geometry3k(DIR, split)` and HF-style readers both work.
Each problem is verified while generating (exact sympy answer vs a measurement on the drawn
figure, answer text round-tripped through the grader, exactly one matching choice); after
writing, both files are read back and every record is checked again against its generator.
Prints a JSON summary as the last line.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import pathlib
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from jaxrl_vl.envs.geometry.generator import generate_problem, verify_choices  # noqa: E402
from jaxrl_vl.envs.geometry.grader import grade_answer  # noqa: E402
from jaxrl_vl.envs.geometry.loader import load_geometry3k  # noqa: E402

TEXT_FIELDS = ("id", "problem", "answer", "ground_truth", "problem_type_graph",
               "problem_type_goal", "template")


def write_dataset(n: int, out_dir: pathlib.Path, seed: int, split: str) -> dict:
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rows_json, rows_parquet = [], []
    for index in range(n):
        record = generate_problem(seed, index)
        image_path = f"images/{record['id']}.png"
        buffer = io.BytesIO()
        record["images"][0].save(buffer, format="PNG")
        (out_dir / image_path).write_bytes(buffer.getvalue())
        base = {k: record[k] for k in TEXT_FIELDS} | {"choices": record["choices"]}
        rows_json.append(base | {"images": [image_path]})
        rows_parquet.append(base | {"images": [{"bytes": buffer.getvalue(), "path": image_path}]})
    with open(out_dir / f"{split}.jsonl", "w", encoding="utf-8") as f:
        for row in rows_json:
            f.write(json.dumps(row) + "\n")
    image_struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([(k, pa.string()) for k in TEXT_FIELDS]
                       + [("choices", pa.list_(pa.string())), ("images", pa.list_(image_struct))])
    pq.write_table(pa.Table.from_pylist(rows_parquet, schema=schema), out_dir / f"{split}.parquet")
    return {"templates": collections.Counter(r["template"] for r in rows_json),
            "goals": collections.Counter(r["problem_type_goal"] for r in rows_json)}


def verify_written(out_dir: pathlib.Path, seed: int, split: str, n: int) -> int:
    """Read both files back; every record must match a fresh regeneration of its answer, decode
    its image, and have exactly one choice equivalent to the answer. Returns records checked."""
    checked = 0
    for file in (out_dir / f"{split}.jsonl", out_dir / f"{split}.parquet"):
        records = load_geometry3k(file)
        if len(records) != n:
            raise SystemExit(f"{file}: expected {n} records, read {len(records)}")
        for index, record in enumerate(records):
            fresh = generate_problem(seed, index)
            if record["answer"] != fresh["answer"] or record["choices"] != fresh["choices"]:
                raise SystemExit(f"{file} record {record['id']}: differs from regeneration")
            if not grade_answer(fresh["answer"], record["answer"]).correct:
                raise SystemExit(f"{file} record {record['id']}: answer does not grade as correct")
            if record["images"][0].size != fresh["images"][0].size:
                raise SystemExit(f"{file} record {record['id']}: image size changed on disk")
            verify_choices(record)
            checked += 1
    return checked


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200, help="number of problems")
    parser.add_argument("--out", type=pathlib.Path, required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="generator seed (deterministic)")
    parser.add_argument("--split", default="train", help="file stem: <split>.jsonl/.parquet")
    args = parser.parse_args(argv)
    if args.n <= 0:
        parser.error(f"--n must be positive, got {args.n}")
    start = time.monotonic()
    counts = write_dataset(args.n, args.out, args.seed, args.split)
    checked = verify_written(args.out, args.seed, args.split, args.n)
    summary = {"n": args.n, "seed": args.seed, "out": str(args.out), "split": args.split,
               "verified_records": checked, "templates": dict(counts["templates"]),
               "goals": dict(counts["goals"]), "seconds": round(time.monotonic() - start, 2)}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
