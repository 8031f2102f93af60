"""Running the gcloud commands: real or dry-run runners, waiting for ACTIVE, and the whole
create -> wait -> copy -> install -> train -> delete sequence with cleanup on Ctrl-C / SIGTERM."""
import dataclasses
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Protocol

from launch.tpu import commands
from launch.tpu.accelerators import TpuSlice
from launch.tpu.commands import Target


class GcloudError(RuntimeError):
    """A gcloud command exited non-zero; the message quotes the command line and its stderr."""


class Runner(Protocol):
    def run(self, argv: list[str], *, capture: bool = False, detach: bool = False) -> str:
        """Runs argv. Returns stdout when `capture` (else "" and output streams to the terminal).
        `detach`: the child gets its own session, so a second Ctrl-C in the terminal cannot stop it."""


class SubprocessRunner:
    def __init__(self, echo: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)):
        self.echo = echo

    def run(self, argv: list[str], *, capture: bool = False, detach: bool = False) -> str:
        self.echo("$ " + commands.format_command(argv))
        try:
            result = subprocess.run(argv, text=True, capture_output=capture, start_new_session=detach)
        except FileNotFoundError as error:
            raise GcloudError(f"{argv[0]} not found: install the Google Cloud CLI (https://cloud.google.com/sdk) "
                              "and run `gcloud auth login`") from error
        if result.returncode != 0:
            detail = f"\n{result.stderr.strip()}" if capture and result.stderr else ""
            raise GcloudError(f"exit {result.returncode}: {commands.format_command(argv)}{detail}")
        return result.stdout if capture else ""


class DryRunRunner:
    """Prints each command line instead of running it; `describe` reports ACTIVE."""

    def __init__(self, out=None):
        self.out = out or sys.stdout
        self.commands: list[list[str]] = []

    def run(self, argv: list[str], *, capture: bool = False, detach: bool = False) -> str:
        self.commands.append(list(argv))
        print(commands.format_command(argv), file=self.out, flush=True)
        return commands.ACTIVE + "\n" if capture and "describe" in argv else ""


def wait_until_active(runner: Runner, target: Target, *, poll_seconds: float = 30.0, timeout_seconds: float = 6 * 3600,
                      sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic,
                      log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)) -> float:
    """Polls the queued resource's state until ACTIVE. Returns seconds waited. Raises GcloudError when
    it FAILED or was SUSPENDED (capacity or quota: see `describe`), TimeoutError after timeout_seconds."""
    start, last_state = clock(), None
    while True:
        state = runner.run(commands.describe_state_command(target), capture=True).strip()
        if state != last_state:
            log(f"[launch.tpu] {target.name}: {state or '(no state yet)'} after {clock() - start:.0f} s")
            last_state = state
        if state == commands.ACTIVE:
            return clock() - start
        if state in commands.FAILED_STATES:
            raise GcloudError(f"queued resource {target.name} is {state}; see `gcloud compute tpus queued-resources "
                              f"describe {target.name} --zone={target.zone} --project={target.project}`")
        if clock() - start > timeout_seconds:
            raise TimeoutError(f"queued resource {target.name} not ACTIVE after {timeout_seconds:.0f} s (last state "
                               f"{state!r}); it stays queued until deleted")
        sleep(poll_seconds)


@dataclasses.dataclass(frozen=True)
class TrainJob:
    """What to run on the workers once the slice is up."""
    config_path: str                      # e.g. configs/sft_digits.py (relative to the repo root)
    overrides: tuple[str, ...] = ()       # e.g. ("--config.train.num_steps=10",)
    code_source: str = "copy"             # "copy" (tarball of this checkout) | "git:URL[#REF]"
    bundle_path: str = ""                 # local tarball for code_source="copy"
    pip_packages: tuple[str, ...] = ("jax[tpu]",)
    env_file: str = ""                    # local KEY=value file (commands.env_file_text) copied to every worker
    install: bool = True


def trainer_overrides(tpu: TpuSlice, target: Target, overrides: tuple[str, ...]) -> tuple[str, ...]:
    """The user's `--config.x=y` overrides, plus `--config.distributed=on` when the job spans several
    hosts or slices (unless the user set it): launch/train.py then calls jax.distributed.initialize()
    on every worker, and on Cloud TPU JAX finds the coordinator, process count and ids itself."""
    if tpu.num_hosts * target.node_count > 1 and not any(o.startswith("--config.distributed") for o in overrides):
        return (*overrides, "--config.distributed=on")
    return tuple(overrides)


def run_on_workers(runner: Runner, target: Target, tpu: TpuSlice, job: TrainJob) -> None:
    """Copy (or clone) the code to every worker, install, then train on all workers at once."""
    if job.code_source == "copy":
        if not job.bundle_path:
            raise ValueError("TrainJob.bundle_path is required with code_source='copy'")
        runner.run(commands.scp_command(target, job.bundle_path, commands.REMOTE_BUNDLE))
    if job.env_file:
        runner.run(commands.scp_command(target, job.env_file, commands.REMOTE_ENV_FILE))
    if job.install:
        runner.run(commands.ssh_command(target, commands.install_script(
            code_source=job.code_source, pip_packages=job.pip_packages)))
    runner.run(commands.ssh_command(target, commands.train_script(
        job.config_path, trainer_overrides(tpu, target, job.overrides), with_env_file=bool(job.env_file))))


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def delete_quietly(runner: Runner, target: Target, log: Callable[[str], None]) -> bool:
    """Deletes the queued resource with Ctrl-C and SIGTERM ignored until gcloud returns. Returns success;
    a failure is logged with the command to rerun, never raised (it would hide the original error)."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        log(f"[launch.tpu] deleting {target.name} (Ctrl-C is ignored until this finishes)")
        runner.run(commands.delete_command(target), detach=True)
        return True
    except Exception as error:  # noqa: BLE001 - report and keep the original exception
        log(f"[launch.tpu] DELETE FAILED ({error}); the TPU may still be billing. Run:\n  "
            + commands.format_command(commands.delete_command(target)))
        return False
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def up(runner: Runner, target: Target, tpu: TpuSlice, job: TrainJob, *, runtime_version: str = "",
       provisioning: str = "on-demand", keep: bool = False, poll_seconds: float = 30.0,
       timeout_seconds: float = 6 * 3600, sleep: Callable[[float], None] = time.sleep,
       log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)) -> None:
    """create -> wait ACTIVE -> copy -> install -> train -> delete. The delete also runs after an error,
    Ctrl-C or SIGTERM once `create` was started (unless keep), but not when gcloud rejected the create
    (the name may belong to someone else's resource); exceptions propagate after it."""
    previous_sigterm = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    create_started = False
    try:
        create = commands.create_command(target, tpu, runtime_version=runtime_version, provisioning=provisioning)
        create_started = True  # an interrupted create may still have made the resource
        try:
            runner.run(create)
        except GcloudError:
            create_started = False  # gcloud refused (e.g. NAME exists already): nothing of ours to delete
            raise
        wait_until_active(runner, target, poll_seconds=poll_seconds, timeout_seconds=timeout_seconds, sleep=sleep, log=log)
        run_on_workers(runner, target, tpu, job)
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)
        if create_started and not keep:
            delete_quietly(runner, target, log)
        elif create_started:
            log(f"[launch.tpu] --keep: {target.name} left running; delete it with\n  "
                + commands.format_command(commands.delete_command(target)))
