"""Write chat SFT datasets (the contract's jsonl + images folder) from the envs' data.

    python tools/make_sft_data.py --env maze2d --n 1000 --out DIR [--reasoning] [--size 9] [--seed 0]
        [--history K] [--n-test 64] [--action-format tuple|keyword] [--prompt-style visgym|compact]
        [--cell-px 25] [--no-feedback] [--positions corners|random] [--max-steps N]
    python tools/make_sft_data.py --env digits --out DIR [--n N] [--root IMAGE_FOLDER] [--image-px 64]

maze2d: solver demonstrations, one multi-turn multi-image record per episode (all assistant turns
are targets: record field "loss_on": "all") in DIR/train.jsonl; frames in DIR/images/. Training seeds are seed, seed+1, ...;
episodes whose shortest path does not fit the step cap, and layouts equal to a held-out eval
layout, are skipped. `--n-test` writes demonstrations on the held-out eval seeds to DIR/test.jsonl
(for held-out NLL). With `--history K` the policy sees only the last K frames, so each turn becomes
its own record ("loss_on": "last": train on the last assistant message only) whose context is
what the model saw.

digits: classifier records ("What is the name of the subject in this photo?" -> "The subject in
this photo is: <name>") in DIR/train.jsonl and DIR/test.jsonl; images in DIR/images/<split>/<class>/
unless --root points at an existing folder (then records reference it by relative path).

The last line printed is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxrl_vl.envs.base import visible_messages  # noqa: E402
from jaxrl_vl.envs.classification import QUESTION, answer_text, image_folder_examples  # noqa: E402
from jaxrl_vl.envs.maze2d import Maze2DEnv, demonstration, eval_layout_keys, eval_seeds  # noqa: E402


def _store_images(messages: list[dict], out_dir: str, stem: str) -> list[dict]:
    """Save PIL images as images/<stem>_<k>.png and return messages that reference them."""
    stored, k = [], 0
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            new = []
            for part in content:
                if part.get("type") == "image" and not isinstance(part["image"], str):
                    rel = f"images/{stem}_{k:02d}.png"
                    part["image"].save(os.path.join(out_dir, rel))
                    part = {"type": "image", "image": rel}
                    k += 1
                new.append(part)
            m = {**m, "content": new}
        stored.append(m)
    return stored


def _maze_records(env: Maze2DEnv, seed: int, out_dir: str, reasoning: bool, history: int | None) -> list[dict]:
    messages = demonstration(env, seed, reasoning=reasoning)
    if messages is None:
        return []
    stem = f"maze{env.size}_s{seed}"
    messages = _store_images(messages, out_dir, stem)
    base = {"env": "maze2d", "size": env.size, "seed": seed}
    if history is None:
        turns = sum(m["role"] == "assistant" for m in messages)
        return [{"id": stem, "messages": messages, **base, "turns": turns, "loss_on": "all"}]
    records = []
    for t, m in enumerate(messages):
        if m["role"] == "assistant":
            context = visible_messages(messages[:t], history)
            records.append({"id": f"{stem}_t{len(records):02d}", "messages": [*context, m], **base,
                            "loss_on": "last"})
    return records


def write_maze2d(args) -> dict:
    env = Maze2DEnv(size=args.size, action_format=args.action_format, prompt_style=args.prompt_style,
                    verbalize=args.reasoning and args.action_format == "tuple", cell_px=args.cell_px,
                    include_feedback=not args.no_feedback, positions=args.positions,
                    max_steps=args.max_steps or None)
    os.makedirs(os.path.join(args.out, "images"), exist_ok=True)
    held_out = eval_layout_keys(args.size, max(args.n_test, 64), args.positions)
    counts = {"train": 0, "test": 0, "skipped_too_long": 0, "skipped_eval_layout": 0}
    with open(os.path.join(args.out, "train.jsonl"), "w") as f:
        seed = args.seed
        while counts["train"] < args.n:
            env.reset(seed)
            if env.layout.key() in held_out:
                counts["skipped_eval_layout"] += 1
            else:
                records = _maze_records(env, seed, args.out, args.reasoning, args.history)
                counts["skipped_too_long"] += not records
                counts["train"] += bool(records)
                for r in records:
                    f.write(json.dumps(r) + "\n")
            seed += 1
            # Small grids have few distinct mazes: stop instead of spinning when most are held out.
            if seed - args.seed > 100 * args.n + 10_000:
                raise SystemExit(
                    f"--size {args.size}: found only {counts['train']} of --n {args.n} training mazes in "
                    f"{seed - args.seed} seeds ({counts['skipped_eval_layout']} equal a held-out layout, "
                    f"{counts['skipped_too_long']} exceed the step cap); use a larger --size or a smaller --n")
    with open(os.path.join(args.out, "test.jsonl"), "w") as f:
        for eval_seed in eval_seeds(args.n_test):
            for r in _maze_records(env, eval_seed, args.out, args.reasoning, args.history):
                f.write(json.dumps(r) + "\n")
                counts["test"] += 1
    return {"out": args.out, "env": "maze2d", "next_seed": seed, **counts}


def write_digits(args) -> dict:
    if args.root is None:
        from jaxrl_vl.data.digits import write_image_folder

        root = os.path.join(args.out, "images")
        write_image_folder(root, image_px=args.image_px)
    else:
        root = args.root
    counts = {}
    for split in ("train", "test"):
        examples = image_folder_examples(root, split)
        if args.n:
            examples = examples[: args.n]
        path = os.path.join(args.out, f"{split}.jsonl")
        with open(path, "w") as f:
            for example_id, image_path, label in examples:
                rel = os.path.relpath(image_path, args.out)
                record = {"id": example_id, "label": label, "messages": [
                    {"role": "user", "content": [{"type": "image", "image": rel}, {"type": "text", "text": QUESTION}]},
                    {"role": "assistant", "content": answer_text(label)}]}
                f.write(json.dumps(record) + "\n")
        counts[split] = len(examples)
    return {"out": args.out, "env": "digits", "image_root": root, **counts}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write chat SFT data (jsonl + images) from an env")
    parser.add_argument("--env", choices=("maze2d", "digits"), required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--n", type=int, default=0, help="maze2d: training episodes (required); digits: cap per split (0 = all)")
    parser.add_argument("--seed", type=int, default=0, help="maze2d: first training seed")
    parser.add_argument("--size", type=int, default=9)
    parser.add_argument("--reasoning", action="store_true", help="maze2d: short <think> before each action")
    parser.add_argument("--history", type=int, default=None, help="maze2d: keep only the last K frames")
    parser.add_argument("--n-test", type=int, default=0, help="maze2d: demonstrations on held-out eval seeds")
    parser.add_argument("--action-format", choices=("tuple", "keyword"), default="tuple")
    parser.add_argument("--prompt-style", choices=("visgym", "compact"), default="visgym")
    parser.add_argument("--cell-px", type=int, default=25)
    parser.add_argument("--positions", choices=("corners", "random"), default="corners",
                        help="maze2d: agent and target at opposite corners (VisGym) or on random floor cells")
    parser.add_argument("--max-steps", type=int, default=0, help="maze2d: step cap per episode (0 = the env default)")
    parser.add_argument("--no-feedback", action="store_true",
                        help="maze2d: later turns carry no 'Environment feedback: ...' line (fewer tokens per turn)")
    parser.add_argument("--root", default=None, help="digits: existing image folder to reference")
    parser.add_argument("--image-px", type=int, default=64, help="digits: image side when writing images")
    args = parser.parse_args(argv)
    if args.env == "maze2d" and args.n < 1:
        parser.error("--n must be >= 1 for --env maze2d (number of training episodes)")
    if args.history is not None and args.history < 1:
        parser.error("--history must be >= 1 (or omitted for the full image history)")
    os.makedirs(args.out, exist_ok=True)
    summary = write_maze2d(args) if args.env == "maze2d" else write_digits(args)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
