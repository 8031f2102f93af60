"""Crash safety of trainer checkpoints (issue 10, item 1): SIGKILL during a checkpoint write.

A child process saves step 1 (a ~48 MiB pytree), then starts saving step 2; the test SIGKILLs it as soon
as step 2's temporary folder appears on disk, i.e. mid-write. Then: step 1 is still the latest finished
checkpoint and restores bitwise; the partial step 2 is never offered for restore and is cleaned up when the
store is reopened; a fresh save of step 2 after the crash works.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np

from jaxrl_vl.train.checkpoints import CheckpointStore

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_state(seed: int) -> dict:
    """A deterministic pytree: 3 x float32 [2048, 2048] (16 MiB each) and an int step."""
    rng = np.random.default_rng(seed)
    return {"params": {f"w{i}": rng.standard_normal((2048, 2048), dtype=np.float32) for i in range(3)},
            "step": np.asarray(seed, np.int32)}


CHILD = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
    from test_reliability_checkpoints import make_state
    from jaxrl_vl.train.checkpoints import CheckpointStore
    store = CheckpointStore({directory!r}, every_steps=1, keep=3, async_save=False)
    store.save(1, make_state(1), {{"position": 1}})
    print("SAVED 1", flush=True)
    state = make_state(2)
    print("SAVING 2", flush=True)
    store.save(2, state, {{"position": 2}})
    print("SAVED 2", flush=True)
    time.sleep(60)
""")


def _entries(directory: str) -> list[str]:
    return sorted(os.listdir(directory)) if os.path.isdir(directory) else []


def test_sigkill_during_checkpoint_write_keeps_previous_checkpoint(tmp_path):
    directory = str(tmp_path / "checkpoints")
    script = CHILD.format(repo=REPO, tests=os.path.join(REPO, "tests"), directory=directory)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env)
    try:
        assert child.stdout.readline().strip() == "SAVED 1", child.stderr.read()
        assert child.stdout.readline().strip() == "SAVING 2"
        deadline = time.monotonic() + 60
        while not any(e.startswith("2") for e in _entries(directory)):  # step 2's temporary folder
            assert time.monotonic() < deadline, f"step 2 never started writing: {_entries(directory)}"
            time.sleep(0.002)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL
    at_kill = _entries(directory)
    assert "2" not in at_kill, f"step 2 finished before the kill, nothing was injected: {at_kill}"

    store = CheckpointStore(directory, every_steps=1, keep=3, async_save=False)
    assert store.latest_step() == 1 and store.all_steps() == [1], (store.all_steps(), at_kill)
    expected = make_state(1)
    state, data_state, step = store.restore(make_state(0))
    assert step == 1 and data_state == {"position": 1}
    for name, array in expected["params"].items():
        restored = np.asarray(state["params"][name])
        assert restored.dtype == array.dtype and restored.tobytes() == array.tobytes(), name
    assert int(state["step"]) == 1
    # the half-written step 2 is cleaned up by the reopened store, and step 2 can be saved again
    assert not [e for e in _entries(directory) if e.startswith("2")], _entries(directory)
    assert store.save(2, make_state(2), {"position": 2})
    store.wait()
    state, data_state, step = store.restore(make_state(0))
    assert step == 2 and data_state == {"position": 2}
    assert np.asarray(state["params"]["w0"]).tobytes() == make_state(2)["params"]["w0"].tobytes()
    store.close()
