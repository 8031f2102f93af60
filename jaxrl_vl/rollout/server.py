"""vLLM server lifecycle: start `vllm serve` as a subprocess, wait for health, stop; attach by URL.

A server is started from the vLLM virtualenv (tools/install_vllm.sh makes `.venv-vllm` with the
launcher `bin/vllm-serve-jaxrl`), bound to 127.0.0.1 on a free port, in its own process group so
that stopping it also stops its engine and worker processes. Its stdout/stderr go to a log file
that stays after it stops (errors quote its tail).

    handle = start_server(ServerConfig(model="/tmp/qwen3_vl_tiny"))
    ...  # handle.url, e.g. http://127.0.0.1:41234
    stop_server(handle)
"""
import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_VLLM_VENV = REPO_ROOT / ".venv-vllm"
LAUNCHER_NAME = "vllm-serve-jaxrl"
VLLM_PLUGIN_NAMES = ("jaxrl_vl_weight_stream", "jaxrl_vl_weight_push")  # plugins/vllm_weight_stream
LOGPROBS_MODES = ("raw_logprobs", "processed_logprobs")  # vLLM's logit modes would break sampled_logprobs
SHM_WORKER_EXTENSION = "jaxrl_vl_vllm_plugin.shm_worker.ShmWeightsWorker"  # the `shm` weight push, same package


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """How to start one vLLM server. Defaults keep a CPU server small (the machine is shared)."""

    model: str  # local HF checkpoint folder
    served_model_name: str = "policy"
    device: str = "cpu"  # "cpu" or "gpu"
    dtype: str = "float32"  # "float32" for exact parity; "auto" downcasts to bf16 on CPU
    max_model_len: int = 2048
    max_num_seqs: int = 8
    max_num_batched_tokens: int = 2048
    cpu_kv_cache_gib: int = 1  # CPU only (VLLM_CPU_KVCACHE_SPACE takes whole GiB)
    # CPU only: the cores the model runs on. "auto": vLLM's choice, which keeps one core for its scheduler
    # and API process (on 2 cores the model gets one); "all": every core this process may use, best when
    # the trainer waits for the rollouts (Maze2D RL on 2 cores: rollouts ~28% faster, same tokens);
    # or a list as "0-3" or "0,2" (VLLM_CPU_OMP_THREADS_BIND).
    cpu_cores: str = "auto"
    gpu_memory_utilization: float = 0.85  # GPU only
    max_images_per_prompt: int = 4
    enforce_eager: bool = True  # CPU: faster start (no compile)
    seed: int = 0
    # what sampled-token logprobs report: "raw_logprobs" (vLLM's default: the model's softmax at temperature 1,
    # before logit bias) or "processed_logprobs" (the distribution sampled from: after logit bias and
    # temperature; RL at rl.temperature != 1 needs it, see losses/rollout_correction.check_config)
    logprobs_mode: str = "raw_logprobs"
    enable_lora: bool = False
    max_lora_rank: int = 16
    max_loras: int = 1
    tool_call_parser: str | None = "hermes"  # enables tool_choice="auto" in render
    cuda_visible_devices: str | None = None  # e.g. "0" for one server per GPU
    # "jaxrl_stream" enables the `stream` weight push (plugins/vllm_weight_stream, installed in the venv)
    weight_transfer_backend: str | None = None
    # True enables the `shm` weight push (the worker adopts shared-memory slots the trainer writes; CPU, eager)
    shm_weights: bool = False
    vllm_venv: str = str(DEFAULT_VLLM_VENV)
    launcher: str | None = None  # an explicit `vllm` executable (e.g. on a GPU host); else the venv's
    extra_args: tuple[str, ...] = ()
    startup_timeout_seconds: float = 300.0
    log_dir: str | None = None  # default: a folder under the system temp dir


@dataclasses.dataclass
class ServerHandle:
    """A running (or attached) server. `process` is None for servers we attached to by URL."""

    url: str
    served_model_name: str
    process: subprocess.Popen | None = None
    log_path: str | None = None
    config: ServerConfig | None = None

    def is_alive(self) -> bool:
        return self.process is None or self.process.poll() is None


def free_loopback_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago (the server binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launcher_path(config: ServerConfig) -> str:
    if config.launcher:
        return config.launcher
    path = Path(config.vllm_venv) / "bin" / LAUNCHER_NAME
    if not path.exists():
        raise FileNotFoundError(f"vLLM launcher {path} not found: run `make install-vllm` "
                                "(tools/install_vllm.sh), or set ServerConfig.launcher to a `vllm` executable")
    return str(path)


def server_command(config: ServerConfig, port: int) -> tuple[list[str], dict[str, str]]:
    """argv and environment for `vllm serve` on 127.0.0.1:port."""
    if config.device not in ("cpu", "gpu"):
        raise ValueError(f"ServerConfig.device={config.device!r}: expected 'cpu' or 'gpu'")
    if not (Path(config.model) / "config.json").exists():
        raise FileNotFoundError(f"ServerConfig.model={config.model!r} has no config.json (a local HF checkpoint folder)")
    argv = [
        launcher_path(config), "serve", str(config.model), "--host", "127.0.0.1", "--port", str(port),
        "--served-model-name", config.served_model_name, "--dtype", config.dtype,
        "--max-model-len", str(config.max_model_len), "--max-num-seqs", str(config.max_num_seqs),
        "--max-num-batched-tokens", str(config.max_num_batched_tokens),
        "--limit-mm-per-prompt", json.dumps({"image": config.max_images_per_prompt, "video": 0}),
        # token-in/token-out routes (render, generate) need scale-out; sampling defaults must not
        # come from the checkpoint's generation_config.json.
        "--enable-scale-out", "--seed", str(config.seed), "--generation-config", "vllm",
    ]
    if config.logprobs_mode not in LOGPROBS_MODES:
        raise ValueError(f"ServerConfig.logprobs_mode={config.logprobs_mode!r}: choose one of {LOGPROBS_MODES}")
    argv += ["--logprobs-mode", config.logprobs_mode]
    if config.enforce_eager:
        argv.append("--enforce-eager")
    if config.device == "gpu":
        argv += ["--gpu-memory-utilization", str(config.gpu_memory_utilization)]
    if config.enable_lora:
        argv += ["--enable-lora", "--max-lora-rank", str(config.max_lora_rank), "--max-loras", str(config.max_loras)]
    if config.weight_transfer_backend:
        argv += ["--weight-transfer-config", json.dumps({"backend": config.weight_transfer_backend})]
    if config.shm_weights:
        if config.device != "cpu" or not config.enforce_eager:
            raise ValueError("ServerConfig.shm_weights=True needs device='cpu' and enforce_eager=True (the model "
                             "reads host shared memory; a compiled graph may keep the old weights)")
        argv += ["--worker-extension-cls", SHM_WORKER_EXTENSION]
    if config.tool_call_parser:
        argv += ["--enable-auto-tool-choice", "--tool-call-parser", config.tool_call_parser]
    argv += list(config.extra_args)

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               VLLM_SERVER_DEV_MODE="1",  # weight-update, pause/resume and collective_rpc routes
               VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
    # Our plugins (plugins/vllm_weight_stream): the jaxrl_stream backend and the one-request weight-push
    # routes. vLLM loads endpoint plugins only when VLLM_PLUGINS names them, and then loads no other
    # general plugin, so this is the whole allowlist (vLLM's own LoRA resolvers stay unused).
    env["VLLM_PLUGINS"] = ",".join(dict.fromkeys([*filter(None, env.get("VLLM_PLUGINS", "").split(",")),
                                                  *VLLM_PLUGIN_NAMES]))
    if config.device == "cpu":
        if not (isinstance(config.cpu_kv_cache_gib, int) and config.cpu_kv_cache_gib >= 1):
            raise ValueError(f"ServerConfig.cpu_kv_cache_gib={config.cpu_kv_cache_gib!r}: vLLM takes a whole "
                             "number of GiB (>= 1) in VLLM_CPU_KVCACHE_SPACE")
        env["VLLM_CPU_KVCACHE_SPACE"] = str(config.cpu_kv_cache_gib)
        bind = _cpu_cores(config.cpu_cores)
        if bind is not None:  # "auto": vLLM's default, or what the caller's environment says
            env["VLLM_CPU_OMP_THREADS_BIND"] = bind
    if config.enable_lora:
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    if config.cuda_visible_devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = config.cuda_visible_devices
    return argv, env


def _cpu_cores(cores: str) -> str | None:
    if cores == "auto":
        return None
    if cores == "all":
        return ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))
    if re.fullmatch(r"\d+(-\d+)?(,\d+(-\d+)?)*", cores):
        return cores
    raise ValueError(f"ServerConfig.cpu_cores={cores!r}: use 'auto', 'all' or a core list such as '0-3' or '0,2'")


def log_tail(log_path: str | None, num_lines: int = 40, max_line_chars: int = 600) -> str:
    """The last lines of a server log (long lines cut: vLLM prints whole registries in errors)."""
    if not log_path or not Path(log_path).exists():
        return "(no log)"
    lines = Path(log_path).read_text(errors="replace").splitlines()[-num_lines:]
    return "\n".join(line if len(line) <= max_line_chars else line[:max_line_chars] + " ..." for line in lines)


def wait_until_healthy(handle: ServerHandle, timeout_seconds: float, poll_seconds: float = 0.5) -> float:
    """Polls GET /health until 200. Returns the seconds waited. Raises RuntimeError if the process
    exits first and TimeoutError after `timeout_seconds`, both quoting the log's tail."""
    start = time.monotonic()
    while True:
        if not handle.is_alive():
            raise RuntimeError(f"vLLM server for {handle.served_model_name} exited with code "
                               f"{handle.process.returncode} before becoming healthy. "
                               f"Log {handle.log_path}:\n{log_tail(handle.log_path)}")
        try:
            if httpx.get(f"{handle.url}/health", timeout=5.0).status_code == 200:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass  # not listening yet
        if time.monotonic() - start > timeout_seconds:
            raise TimeoutError(f"vLLM server at {handle.url} not healthy after {timeout_seconds:.0f} s. "
                               f"Log {handle.log_path}:\n{log_tail(handle.log_path)}")
        time.sleep(poll_seconds)


def start_server(config: ServerConfig) -> ServerHandle:
    """Starts `vllm serve` and waits until it is healthy (stopping it if it never gets there)."""
    port = free_loopback_port()
    argv, env = server_command(config, port)
    log_dir = Path(config.log_dir or Path(tempfile.gettempdir()) / "jaxrl_vl_vllm_logs")
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"vllm-{config.served_model_name}-{port}-{int(time.time())}.log"
    with open(log_path, "w") as log_file:
        log_file.write("$ " + " ".join(argv) + "\n")
        log_file.flush()
        process = subprocess.Popen(argv, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True,
                                   # The kernel ties PDEATHSIG to the forking *thread*: only safe from the
                                   # main thread (a server started from a worker thread would die with it).
                                   preexec_fn=_die_with_parent if threading.current_thread() is threading.main_thread()
                                   else None)
    handle = ServerHandle(url=f"http://127.0.0.1:{port}", served_model_name=config.served_model_name,
                          process=process, log_path=str(log_path), config=config)
    try:
        wait_until_healthy(handle, config.startup_timeout_seconds)
    except BaseException:
        stop_server(handle)
        raise
    return handle


def stop_server(handle: ServerHandle, grace_seconds: float = 20.0) -> int | None:
    """SIGTERM to the server's process group, SIGKILL after `grace_seconds`. Returns the exit code
    (None for attached servers, which we do not own)."""
    process = handle.process
    if process is None:
        return None
    if process.poll() is None:
        _signal_group(process, signal.SIGTERM)
        try:
            process.wait(timeout=grace_seconds)
        except subprocess.TimeoutExpired:
            _signal_group(process, signal.SIGKILL)
            process.wait(timeout=30)
    # Children (engine core, workers) share the group; make sure none outlives the server.
    _signal_group(process, signal.SIGKILL)
    return process.returncode


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it when the process that started it dies (even by
    SIGKILL), so a killed trainer never leaves an orphaned vLLM server holding memory and cores.
    Servers started from worker threads rely on stop_server instead."""
    if sys.platform.startswith("linux"):
        import ctypes
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)  # start_new_session=True made pid the group id
    except ProcessLookupError:
        pass


def restart_server(handle: ServerHandle) -> ServerHandle:
    """Stops a server we started and starts a new one with the same config (a new port)."""
    if handle.config is None:
        raise ValueError(f"cannot restart {handle.url}: attached by URL, not started here")
    stop_server(handle)
    return start_server(handle.config)


def attach_server(url: str, served_model_name: str | None = None, timeout_seconds: float = 30.0,
                  api_key: str | None = None) -> ServerHandle:
    """A handle for a server someone else runs. Waits for /health; reads the served model name
    from /v1/models when not given."""
    handle = ServerHandle(url=url.rstrip("/"), served_model_name=served_model_name or "")
    wait_until_healthy(handle, timeout_seconds)
    if not served_model_name:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        response = httpx.get(f"{handle.url}/v1/models", timeout=10.0, headers=headers)
        if response.status_code == 401:
            raise RuntimeError(f"{url}/v1/models: 401 Unauthorized; pass the server's token (config vllm.token_env)")
        models = response.json().get("data", [])
        if not models:
            raise RuntimeError(f"{url}/v1/models lists no model")
        handle.served_model_name = models[0]["id"]
    return handle
