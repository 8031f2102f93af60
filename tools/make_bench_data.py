#!/usr/bin/env python
"""Synthetic SFT data of a given row shape, for timing `launch/train.py` (tools/bench_trainer.py) on real batches.

    python tools/make_bench_data.py --model DIR --out DATA --layout chat --images 4 --image-size 448 --rows 64
    python tools/make_bench_data.py --model DIR --out DATA --layout image_folder --image-size 448 --rows 512

chat: jsonl records (train/test.jsonl + PNGs) of one user turn with `--images` images and a question, and an
assistant answer long enough that every record fills `--max-length` tokens once truncated (so each row holds
`--images` images and ~max_length tokens, the loss on the answer). image_folder: <out>/<split>/<class>/*.png, one
image per record (the cookbook classifier layout); with data.packing those pack into rows of many images.
Pixels are seeded noise and text is drawn from the checkpoint tokenizer's own words: shapes, not meaning.
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np
from PIL import Image

WORDS = ("the agent moves left then right and reaches the goal after three turns while the maze keeps every "
         "wall in place so each step needs a new look at the frame").split()


def _image(rng, size: int, path: str) -> str:
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def chat_records(out: str, split: str, rows: int, images: int, size: int, answer_words: int, rng) -> None:
    folder = os.path.join(out, f"{split}_images")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(out, f"{split}.jsonl"), "w") as f:
        for i in range(rows):
            content = [{"type": "image", "image": _image(rng, size, os.path.join(folder, f"{i}_{k}.png"))}
                       for k in range(images)]
            content.append({"type": "text", "text": "Describe what happens in these frames."})
            answer = " ".join(rng.choice(WORDS, answer_words))
            f.write(json.dumps({"id": f"{split}{i}", "messages": [{"role": "user", "content": content},
                                                                 {"role": "assistant", "content": answer}]}) + "\n")


def image_folder(out: str, split: str, rows: int, size: int, rng, classes: int = 10) -> None:
    for i in range(rows):
        folder = os.path.join(out, split, f"class_{i % classes}")
        os.makedirs(folder, exist_ok=True)
        _image(rng, size, os.path.join(folder, f"{i}.png"))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--layout", choices=("chat", "image_folder"), default="chat")
    p.add_argument("--rows", type=int, default=64, help="training records (test: a quarter, at least 4)")
    p.add_argument("--images", type=int, default=4, help="images per chat record")
    p.add_argument("--image-size", type=int, default=448)
    p.add_argument("--max-length", type=int, default=4096, help="chat: the answer is long enough to fill this")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    for split, rows in (("train", args.rows), ("test", max(4, args.rows // 4))):
        if args.layout == "chat":
            chat_records(args.out, split, rows, args.images, args.image_size, args.max_length, rng)
        else:
            image_folder(args.out, split, rows, args.image_size, rng)
    print(json.dumps({"out": args.out, "layout": args.layout, "rows": args.rows}))


if __name__ == "__main__":
    main()
