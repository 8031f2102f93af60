"""Real multi-process JAX on this machine: N `jax.distributed` processes on 127.0.0.1, each with
fake CPU devices and gloo collectives, running one Python script. Tests use it to check that what
runs on N hosts equals what runs in one process.

    results = run_processes(SCRIPT, ["--out", str(tmp_path)], num_processes=2, devices_per_process=4)

Each process runs `python SCRIPT ARGS...` with JAXRL_VL_PROCESS_ID / JAXRL_VL_NUM_PROCESSES /
JAX_COORDINATOR_ADDRESS set (the trainer's `distributed="auto"` initializes from
JAX_COORDINATOR_ADDRESS; a plain script calls `initialize_from_env()` below), and must exit 0.
Returns each process's (stdout, stderr), in process order.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(process_id: int, num_processes: int, devices_per_process: int, port: int) -> dict:
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}",
               JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(num_processes),
               JAX_PROCESS_ID=str(process_id), JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
               PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]))
    return env


def run_processes(script: str | os.PathLike, args: list[str] = (), *, num_processes: int = 2,
                  devices_per_process: int = 4, timeout_seconds: float = 600.0) -> list[tuple[str, str]]:
    """Starts the processes, waits for all; raises AssertionError with every process's output tail when one
    fails or the group outlives timeout_seconds (all are killed then)."""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, str(script), *map(str, args)], cwd=REPO,
                              env=process_env(i, num_processes, devices_per_process, port),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(num_processes)]
    outputs, failed = [], False
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=timeout_seconds)
            outputs.append((out, err))
            failed |= proc.returncode != 0
    except subprocess.TimeoutExpired:
        failed = True
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                outputs.append(proc.communicate())
    if failed:
        tails = "\n".join(f"--- process {i} (rc {p.returncode}):\n{o[-2000:]}\n{e[-4000:]}"
                          for i, (p, (o, e)) in enumerate(zip(procs, outputs)))
        raise AssertionError(f"a process of {script} failed or timed out:\n{tails}")
    return outputs


def initialize_from_env() -> None:
    """jax.distributed.initialize from the variables run_processes sets (for scripts that do not go through
    the trainer's own `distributed` setting)."""
    import jax
    jax.config.update("jax_cpu_collectives_implementation", os.environ["JAX_CPU_COLLECTIVES_IMPLEMENTATION"])
    jax.distributed.initialize(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                               num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                               process_id=int(os.environ["JAX_PROCESS_ID"]))
