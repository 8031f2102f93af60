"""Disaggregated mode, GPU side: launch/vllm_gpu_server.sh refuses unsafe addresses and missing
tokens, launch/vllm_token_auth.py closes every route but /health, and (with the CPU vLLM env) a real
server started by the script on loopback enforces the token on the dev-mode and OpenAI routes."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "launch" / "vllm_gpu_server.sh"
VLLM_LAUNCHER = REPO / ".venv-vllm" / "bin" / "vllm-serve-jaxrl"
TOKEN = "t" * 40

sys.path.insert(0, str(REPO / "launch"))
import vllm_token_auth  # noqa: E402  (standalone module, as vLLM imports it)


def _app(environ):
    ok = lambda request: JSONResponse({"path": request.url.path})  # noqa: E731
    app = Starlette(routes=[Route(p, ok, methods=["GET", "POST"]) for p in ("/health", "/pause", "/collective_rpc",
                                                                             "/v1/models", "/update_weights")])
    return vllm_token_auth.RequireBearerToken(app, environ=environ)


def test_middleware_requires_the_token_everywhere_but_health():
    client = TestClient(_app({vllm_token_auth.TOKEN_ENV: TOKEN}))
    assert client.get("/health").status_code == 200
    for path in ("/pause", "/collective_rpc", "/v1/models", "/update_weights"):
        assert client.post(path).status_code == 401, path
        assert client.post(path, headers={"Authorization": "Bearer wrong"}).status_code == 401, path
        assert client.post(path, headers={"Authorization": TOKEN}).status_code == 401, path  # no scheme
        assert client.post(path, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200, path


def test_middleware_refuses_to_start_without_a_long_token():
    with pytest.raises(RuntimeError, match="at least 32 characters"):
        _app({vllm_token_auth.TOKEN_ENV: "short"})
    with pytest.raises(RuntimeError, match="JAXRL_VL_SERVER_TOKEN"):
        _app({})


def _script(*args, token=TOKEN, timeout=30):
    env = {k: v for k, v in os.environ.items() if k != vllm_token_auth.TOKEN_ENV}
    if token is not None:
        env[vllm_token_auth.TOKEN_ENV] = token
    env.setdefault("VLLM_BIN", str(VLLM_LAUNCHER) if VLLM_LAUNCHER.exists() else "/bin/false")
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("host,message", [("0.0.0.0", "binds every interface"), ("::", "binds every interface"),
                                          ("8.8.8.8", "not a private or loopback"), ("gpu-host", "not a name")])
def test_script_refuses_public_or_wildcard_addresses(host, message):
    result = _script("--model", "/nonexistent", "--host", host)
    assert result.returncode != 0 and message in result.stderr, result.stderr


def test_script_refuses_a_missing_token():
    result = _script("--model", "/nonexistent", "--host", "10.1.2.3", token=None)
    assert result.returncode == 2 and "JAXRL_VL_SERVER_TOKEN must hold" in result.stderr, result.stderr
    result = _script("--host", "10.1.2.3")
    assert result.returncode == 2 and "--model" in result.stderr


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_script_serves_on_loopback_with_the_token_enforced(tiny_model_dir, tmp_path):
    if not VLLM_LAUNCHER.exists():
        pytest.skip("needs the CPU vLLM environment (make install-vllm)")
    port = _free_port()
    url, auth, log_path = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {TOKEN}"}, tmp_path / "server.log"
    process = _start_server(tiny_model_dir, port, log_path, "--weight-backend", "none", "--max-model-len", "1024")
    try:
        _wait_healthy(process, url, log_path)
        for method, path in (("GET", "/v1/models"), ("POST", "/pause"), ("POST", "/collective_rpc"),
                             ("GET", "/weight_info"), ("POST", "/inference/v1/generate")):
            assert httpx.request(method, f"{url}{path}", timeout=10).status_code == 401, path
        models = httpx.get(f"{url}/v1/models", headers=auth, timeout=10)
        assert models.status_code == 200 and models.json()["data"][0]["id"] == "policy"
        info = httpx.get(f"{url}/weight_info", headers=auth, timeout=10)
        assert info.status_code == 200, info.text  # dev-mode route reachable with the token
    finally:
        _stop(process)


def _start_server(model_dir: str, port: int, log_path: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, vllm_token_auth.TOKEN_ENV: TOKEN, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    return subprocess.Popen(["bash", str(SCRIPT), "--model", model_dir, "--host", "127.0.0.1", "--port", str(port),
                             "--device", "cpu", "--max-num-seqs", "4", *extra], env=env, stdout=open(log_path, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def _wait_healthy(process: subprocess.Popen, url: str, log_path: Path, timeout_seconds: float = 300) -> None:
    deadline = time.monotonic() + timeout_seconds
    while True:
        assert process.poll() is None, log_path.read_text()[-3000:]
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"server not healthy in {timeout_seconds} s"
        time.sleep(1)


def _stop(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGTERM)  # the script exec'd vLLM in its own session: the group is ours
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_trainer_and_server_as_two_processes_stream_weights_for_three_rl_steps(tiny_model_dir, tmp_path):
    """The disaggregated topology on loopback: vLLM from launch/vllm_gpu_server.sh (token required,
    jaxrl_stream backend), the trainer from launch/train.py with configs/rl_maze_disaggregated.py.
    After 3 RL steps the server serves weight version 3, every rollout came from the expected version
    and the trainer/vLLM log-prob drift stays at fp32 noise."""
    if not VLLM_LAUNCHER.exists():
        pytest.skip("needs the CPU vLLM environment (make install-vllm)")
    port = _free_port()
    url, log_path = f"http://127.0.0.1:{port}", tmp_path / "server.log"
    server = _start_server(tiny_model_dir, port, log_path, "--max-model-len", "2048", "--max-images-per-prompt", "4")
    try:
        _wait_healthy(server, url, log_path)
        run_dir = tmp_path / "run"
        overrides = [f"--config.model.path={tiny_model_dir}", f"--config.vllm.url={url}", f"--config.run_dir={run_dir}",
                     "--config.model.dtype=float32", "--config.train.num_steps=3", "--config.rl.num_groups=2",
                     "--config.rl.samples_per_group=2", "--config.rl.eval_episodes=2", "--config.rl.env_kwargs.max_steps=3",
                     "--config.vllm.max_images_per_prompt=4", "--config.rl.max_concurrent_episodes=4",
                     "--config.vllm.max_concurrent_requests=4", "--config.vllm.max_model_len=2048",
                     "--config.rl.max_sequence_tokens=2048", "--config.rl.filter_zero_variance_groups=False",
                     "--config.rl.save_samples=0", "--config.checkpoint.every_steps=1000",
                     "--config.metrics.use_wandb=False", "--config.metrics.progress_bar=False",
                     "--config.metrics.plot_at_end=False", "--config.export.at_end=False"]
        env = {**os.environ, vllm_token_auth.TOKEN_ENV: TOKEN, "JAX_PLATFORMS": "cpu"}
        trainer = subprocess.run([sys.executable, "launch/train.py", "--config", "configs/rl_maze_disaggregated.py",
                                  *overrides], cwd=REPO, env=env, capture_output=True, text=True, timeout=780)
        assert trainer.returncode == 0, trainer.stderr[-4000:]
        summary = json.loads(trainer.stdout.strip().splitlines()[-1])
        assert summary["rl_steps"] == 3
        assert summary["max_drift"] is not None and summary["max_drift"] < 1e-3, summary
        info = httpx.get(f"{url}/weight_info", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10).json()
        assert info["weight_version"] == "3", info
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        stale = [r["rollout/stale_turns"] for r in records if "rollout/stale_turns" in r]
        assert len(stale) == 3 and all(s == 0 for s in stale), stale
        assert "/jaxrl/weights/commit" in log_path.read_text()  # the plugin's stream route was used
    finally:
        _stop(server)
