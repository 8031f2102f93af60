"""The vLLM server is tied to its starter's life only when started from the main thread.

Linux delivers PR_SET_PDEATHSIG when the forking *thread* exits, so a server started from a worker
thread (as the SFT eval generator does) must not get it, or it dies as soon as that thread returns.
"""
import threading

from jaxrl_vl.rollout import server as server_lib


def _preexec_used(monkeypatch, tmp_path, in_thread: bool):
    seen = {}

    class FakePopen:
        pid = 123456789

        def __init__(self, argv, **kwargs):
            seen["preexec_fn"] = kwargs.get("preexec_fn")

        def poll(self):
            return None

    monkeypatch.setattr(server_lib.subprocess, "Popen", FakePopen)
    monkeypatch.setattr(server_lib, "wait_until_healthy", lambda handle, timeout: None)
    monkeypatch.setattr(server_lib, "server_command", lambda config, port: (["vllm", "serve"], {}))
    config = server_lib.ServerConfig(model=str(tmp_path), served_model_name="m", log_dir=str(tmp_path))
    if in_thread:
        worker = threading.Thread(target=lambda: seen.setdefault("handle", server_lib.start_server(config)))
        worker.start()
        worker.join()
        assert "handle" in seen, "start_server failed in the worker thread"
    else:
        server_lib.start_server(config)
    assert "preexec_fn" in seen, "start_server did not reach Popen"
    return seen["preexec_fn"]


def test_main_thread_start_dies_with_parent(monkeypatch, tmp_path):
    assert _preexec_used(monkeypatch, tmp_path, in_thread=False) is server_lib._die_with_parent


def test_worker_thread_start_outlives_the_thread(monkeypatch, tmp_path):
    assert _preexec_used(monkeypatch, tmp_path, in_thread=True) is None
