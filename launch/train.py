"""Train from an experiment config.

    python launch/train.py --config configs/<x>.py [--config.a.b=value ...]

`config.trainer` picks the loop ("sft" now, "rl" once jaxrl_vl/train/rl_loop.py exists). The run
directory is `--config.run_dir` or `runs/<config.name>`; rerunning the same command resumes from
its latest checkpoint. The last line printed is a JSON summary (run_dir, steps, wall_seconds and
the final eval metrics); progress and logs go to stderr.
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxrl_vl.train.config_overrides import ConfigError, parse_command_line  # noqa: E402
from jaxrl_vl.xla_flags import apply_defaults  # noqa: E402

TRAINERS = ("sft", "rl", "sft_then_rl")


def run(config) -> dict:
    """Dispatch on config.trainer; returns the summary dict."""
    from jaxrl_vl.train.distributed import initialize
    initialize(config.get("distributed", "auto"))
    if config.trainer == "sft":
        from jaxrl_vl.train.sft_loop import run_sft
        return run_sft(config)
    if config.trainer == "rl":
        try:
            from jaxrl_vl.train.rl_loop import run_rl
        except ModuleNotFoundError as err:
            raise ConfigError(f"trainer='rl' needs jaxrl_vl/train/rl_loop.py ({err})") from None
        return run_rl(config)
    if config.trainer == "sft_then_rl":
        from jaxrl_vl.train.pipeline import run_sft_then_rl
        return run_sft_then_rl(config)
    raise ConfigError(f"config.trainer={config.trainer!r}; choose one of {TRAINERS}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    apply_defaults()
    try:
        config, _ = parse_command_line(argv)
        summary = run(config)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    sys.stderr.flush()
    from jaxrl_vl.train.distributed import is_main
    if is_main():  # one process reports (every process returns the same summary)
        print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
