"""Plot a run's metrics.jsonl as PNG curves.

    python tools/plot_metrics.py RUN_DIR [--out DIR] [--keys train/loss,eval/test_accuracy]

Writes one PNG per metric group prefix ("train.png", "eval.png", ...; one panel per metric, x =
step) into RUN_DIR/plots (or --out), and prints the written paths as a JSON list on the last line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxrl_vl.train.plots import plot_run  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--out", default=None, help="output folder (default RUN_DIR/plots)")
    parser.add_argument("--keys", default="", help="comma-separated metric names to plot (default all)")
    args = parser.parse_args(argv)
    keys = [k for k in args.keys.split(",") if k] or None
    try:
        paths = plot_run(args.run_dir, args.out, keys)
    except (FileNotFoundError, KeyError) as err:
        raise SystemExit(f"error: {err}") from None
    print(json.dumps(paths))


if __name__ == "__main__":
    main()
