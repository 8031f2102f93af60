"""Rollout servers under supervision: notice a dead vLLM server quickly, then restart it or stop.

The RL loop waits on its rollouts through `ServerSupervisor.wait`, which checks every `poll_seconds`
whether a server process it started has exited (a SIGKILLed or OOM-killed server is noticed within
about a second, however long the clients' own retries and timeouts would take). After a failure,
`restart_failed` applies `vllm.on_server_failure`:
  "restart": the dead server's process group is killed and the server started again with the same
             config (a new port, the base checkpoint); the caller then pushes the trainer's current
             weights into it under the current weight_version and regenerates the whole rollout batch
             (the partial one is discarded), so no trajectory mixes servers or versions.
             At most `vllm.max_server_restarts` restarts per run.
  "stop":    ServerFailure naming the server, its log and the config key.
Servers attached by URL (not started here) cannot be restarted: a failed /health is a ServerFailure.
"""
from __future__ import annotations

import concurrent.futures
import logging
from collections.abc import Callable
from typing import Any

import httpx

from jaxrl_vl.rollout import server as server_lib

log = logging.getLogger(__name__)
ON_FAILURE = ("restart", "stop")


class ServerFailure(RuntimeError):
    """A rollout server died (or stopped answering) and the run cannot continue on it."""


class ServerDied(RuntimeError):
    """A supervised server process exited while work was waiting on it."""


class ServerSupervisor:
    """Liveness and restarts for `handles` (a list shared with the caller, updated in place)."""

    def __init__(self, handles: list, *, on_failure: str = "restart", max_restarts: int = 3,
                 poll_seconds: float = 1.0):
        if on_failure not in ON_FAILURE:
            raise ValueError(f"vllm.on_server_failure={on_failure!r}: choose one of {ON_FAILURE}")
        if max_restarts < 0:
            raise ValueError(f"vllm.max_server_restarts={max_restarts}: must be >= 0")
        self.handles, self.on_failure, self.max_restarts = handles, on_failure, max_restarts
        self.poll_seconds = poll_seconds
        self.restarts = 0
        self.generation = 0  # bumped by every restart: work submitted before it is void

    def dead(self) -> list[int]:
        """Indices of servers started here whose process has exited."""
        return [i for i, h in enumerate(self.handles) if h.process is not None and h.process.poll() is not None]

    def wait(self, future: concurrent.futures.Future) -> Any:
        """future.result(), but raises ServerDied (after cancelling the future) as soon as a
        supervised server process is gone."""
        while True:
            done, _ = concurrent.futures.wait([future], timeout=self.poll_seconds)
            if done:
                return future.result()
            if self.dead():
                future.cancel()
                raise ServerDied(f"vLLM server(s) {[self.handles[i].url for i in self.dead()]} exited")

    def _unanswering_attached(self) -> list[int]:
        bad = []
        for i, handle in enumerate(self.handles):
            if handle.process is None:
                try:
                    healthy = httpx.get(f"{handle.url}/health", timeout=10.0).status_code == 200
                except httpx.HTTPError:
                    healthy = False
                if not healthy:
                    bad.append(i)
        return bad

    def restart_failed(self, what: str) -> list[int]:
        """After an error during `what`: restarts every failed server as configured and returns
        their indices ([] when all servers are fine: the error was something else). Raises
        ServerFailure when the policy is "stop", restarts are used up, or an attached server failed."""
        failed = self.dead() or self._unanswering_attached()
        for index in failed:
            handle = self.handles[index]
            if handle.process is None:
                raise ServerFailure(f"vLLM server {handle.url} (attached by vllm.url) stopped answering /health "
                                    f"during {what}; it was not started by this run, so it cannot be restarted from "
                                    "here: restart it and rerun the same command (the run resumes from its last "
                                    "checkpoint)")
            cause = (f"vLLM server {handle.url} died (exit code {handle.process.returncode}) during {what}; "
                     f"its log: {handle.log_path}")
            if self.on_failure == "stop":
                raise ServerFailure(f"{cause}. vllm.on_server_failure='stop' ends the run; set "
                                    "--config.vllm.on_server_failure=restart to restart the server on the current "
                                    f"weights instead. Log tail:\n{server_lib.log_tail(handle.log_path, 15)}")
            if self.restarts >= self.max_restarts:
                raise ServerFailure(f"{cause}. It was already restarted {self.restarts} times "
                                    f"(vllm.max_server_restarts={self.max_restarts}); stopping the run. Log tail:\n"
                                    f"{server_lib.log_tail(handle.log_path, 15)}")
            log.warning("%s; restarting it (restart %d of at most %d)", cause, self.restarts + 1, self.max_restarts)
            self.handles[index] = server_lib.restart_server(handle)
            self.restarts += 1
            log.warning("vLLM server restarted at %s (log %s)", self.handles[index].url, self.handles[index].log_path)
        if failed:
            self.generation += 1
        return failed


def run_supervised(supervisor: ServerSupervisor, submit: Callable[[], concurrent.futures.Future],
                   on_restart: Callable[[list[int]], None], *, what: str = "rollouts",
                   first: tuple | None = None) -> Any:
    """Runs `submit()` (work on the servers) to completion; when it fails or a server dies, restarts
    the failed servers (`restart_failed`), lets `on_restart(indices)` give them the current weights,
    and submits the work again from scratch (the partial results are discarded). An error while
    every server is fine, and none was restarted since the work was submitted, is re-raised.
    `first`: (future, supervisor.generation at its submission) of work already running."""
    future, generation = first or (submit(), supervisor.generation)
    while True:
        try:
            return supervisor.wait(future)
        except Exception:
            future.cancel()
            restarted = supervisor.restart_failed(what)
            if not restarted and supervisor.generation == generation:
                raise
            if restarted:
                on_restart(restarted)
            log.warning("%s regenerated after a vLLM server restart (the partial batch was discarded)", what)
            future, generation = submit(), supervisor.generation
