"""CLI: `python -m launch.tpu {create,run,logs,delete,up} NAME [flags] [--dry-run] [-- TRAIN OVERRIDES]`.

    # one v5e-8 host: create, wait, copy this checkout, install, train, delete (also on Ctrl-C)
    python -m launch.tpu up my-run --tpu=v5e-8 --zone=us-west4-a --project=my-proj --spot \\
        --config=configs/sft_digits.py -- --config.train.num_steps=300
    # the same steps by hand; `logs` tails ~/jaxrl_vl_train.log on worker 0
    python -m launch.tpu create my-run --tpu=v5p-16 --zone=us-east5-a --project=my-proj --wait
    python -m launch.tpu run my-run --tpu=v5p-16 --zone=us-east5-a --project=my-proj --config=configs/rl_maze.py
    python -m launch.tpu logs my-run --zone=us-east5-a --project=my-proj
    python -m launch.tpu delete my-run --zone=us-east5-a --project=my-proj

Arguments after `--` go to launch/train.py unchanged (`--config.x=y` overrides). `--dry-run` prints
every gcloud command line and runs nothing (no tarball is built either).
"""
import argparse
import os
import sys
import tempfile
from pathlib import Path

from launch.tpu import commands, lifecycle
from launch.tpu.accelerators import parse_tpu
from launch.tpu.bundle import make_bundle


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m launch.tpu", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="action", required=True)

    def add(name, help_text, *, tpu=False, provisioning=False, train=False, wait=False):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("name", help="queued-resource id (also the node id, or node prefix for multi-slice)")
        p.add_argument("--zone", required=True)
        p.add_argument("--project", required=True)
        p.add_argument("--node-count", type=int, default=1, help="slices (multi-slice when > 1)")
        p.add_argument("--dry-run", action="store_true", help="print the gcloud commands, run nothing")
        if tpu:
            p.add_argument("--tpu", required=True, help="v5e-8 | v5litepod-8 | v5p-16 | v6e-16 | v4-32 ...")
        if provisioning:
            p.add_argument("--runtime-version", default="", help="default: the generation's (v2-alpha-tpuv5-lite, ...)")
            group = p.add_mutually_exclusive_group()
            for model in commands.PROVISIONING_MODELS[1:]:
                group.add_argument(f"--{model}", dest="provisioning", action="store_const", const=model)
            p.set_defaults(provisioning="on-demand")
        if wait:
            p.add_argument("--wait", action="store_true", help="poll until ACTIVE")
        if wait or name == "up":
            p.add_argument("--poll-seconds", type=float, default=30.0)
            p.add_argument("--timeout-minutes", type=float, default=360.0)
        if train:
            p.add_argument("--config", required=True, help="experiment config, relative to the repo root")
            p.add_argument("--code", default="copy", help="'copy' (tarball of this checkout) or git:URL[#REF]")
            p.add_argument("--bundle-path", default="", help="where to write the tarball (default: temp dir)")
            p.add_argument("--pip", action="append", default=None, help="extra pip requirement (default: jax[tpu])")
            p.add_argument("--env", action="append", default=[], metavar="KEY[=VALUE]",
                           help="trainer environment; KEY alone copies the local value. Sent in a 0600 file "
                                "by scp, never on a command line (safe for tokens)")
            p.add_argument("--skip-install", action="store_true")
        return p

    add("create", "create the queued resource", tpu=True, provisioning=True, wait=True)
    add("run", "copy the code, install and train on every worker (resource must be ACTIVE)", tpu=True, train=True)
    logs = add("logs", "tail the training log of one worker")
    logs.add_argument("--worker", default="0")
    logs.add_argument("--lines", type=int, default=100)
    logs.add_argument("--no-follow", action="store_true")
    add("delete", "delete the queued resource and its nodes")
    up = add("up", "create, wait, run, then delete (also on Ctrl-C)", tpu=True, provisioning=True, train=True)
    up.add_argument("--keep", action="store_true", help="do not delete at the end")
    return parser


def _train_job(args, dry_run: bool) -> lifecycle.TrainJob:
    env = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep:
            if key not in os.environ:
                raise ValueError(f"--env={item!r}: {key} is not set here; give KEY=VALUE or export {key}")
            value = os.environ[key]
        env[key] = value
    env_text = commands.env_file_text(env) if env else ""
    env_file = str(Path(tempfile.gettempdir()) / f"jaxrl_vl_env_{args.name}") if env else ""
    if env and not dry_run:
        fd, env_file = tempfile.mkstemp(prefix=f"jaxrl_vl_env_{args.name}_")  # 0600, a fresh name
        with os.fdopen(fd, "w") as f:
            f.write(env_text)
    bundle_path = args.bundle_path or str(Path(tempfile.gettempdir()) / f"jaxrl_vl_code_{args.name}.tar.gz")
    if args.code == "copy" and not dry_run:
        path, num_files = make_bundle(bundle_path)
        print(f"[launch.tpu] code bundle {path}: {num_files} files", file=sys.stderr)
    return lifecycle.TrainJob(config_path=args.config, overrides=tuple(args.overrides), code_source=args.code,
                              bundle_path=bundle_path if args.code == "copy" else "",
                              pip_packages=tuple(args.pip) if args.pip else ("jax[tpu]",), env_file=env_file,
                              install=not args.skip_install)


def _remove_local_env_file(job: lifecycle.TrainJob, dry_run: bool) -> None:
    if job.env_file and not dry_run:
        Path(job.env_file).unlink(missing_ok=True)


def main(argv: list[str] | None = None, runner: lifecycle.Runner | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    args = _parser().parse_args(argv)
    args.overrides = overrides
    if overrides and args.action not in ("run", "up"):
        print(f"error: arguments after `--` are trainer overrides; `{args.action}` takes none", file=sys.stderr)
        return 2
    runner = runner or (lifecycle.DryRunRunner() if args.dry_run else lifecycle.SubprocessRunner())
    try:
        target = commands.Target(args.name, args.zone, args.project, args.node_count)
        tpu = parse_tpu(args.tpu) if hasattr(args, "tpu") else None
        if args.action == "create":
            runner.run(commands.create_command(target, tpu, runtime_version=args.runtime_version,
                                               provisioning=args.provisioning))
            if args.wait:
                lifecycle.wait_until_active(runner, target, poll_seconds=args.poll_seconds,
                                            timeout_seconds=args.timeout_minutes * 60)
        elif args.action == "run":
            job = _train_job(args, args.dry_run)
            try:
                lifecycle.run_on_workers(runner, target, tpu, job)
            finally:
                _remove_local_env_file(job, args.dry_run)
        elif args.action == "logs":
            runner.run(commands.ssh_command(target, commands.logs_script(args.lines, not args.no_follow),
                                            worker=args.worker))
        elif args.action == "delete":
            runner.run(commands.delete_command(target))
        elif args.action == "up":
            job = _train_job(args, args.dry_run)
            try:
                lifecycle.up(runner, target, tpu, job, runtime_version=args.runtime_version,
                             provisioning=args.provisioning, keep=args.keep, poll_seconds=args.poll_seconds,
                             timeout_seconds=args.timeout_minutes * 60)
            finally:
                _remove_local_env_file(job, args.dry_run)
    except (ValueError, lifecycle.GcloudError, TimeoutError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("[launch.tpu] interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
