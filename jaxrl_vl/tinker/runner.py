"""Build and run the Tinker server: backend + storage + sampler (vLLM) + FastAPI app, and uvicorn.

`build_service` wires the parts; `start_vllm_for` starts a LoRA-enabled CPU/GPU vLLM server on the
base checkpoint (jaxrl_vl.rollout.server); `ServerThread` runs uvicorn in a background thread (tests).
"""
from __future__ import annotations

import asyncio
import threading
import time

import httpx
import uvicorn

from jaxrl_vl.rollout.server import ServerConfig, ServerHandle, restart_server, start_server, stop_server
from jaxrl_vl.tinker.app import DEFAULT_MAX_BODY_BYTES, create_app
from jaxrl_vl.tinker.backend import TrainingBackend
from jaxrl_vl.tinker.futures import FutureStore
from jaxrl_vl.tinker.sampling import VLLMSampler
from jaxrl_vl.tinker.service import TinkerService
from jaxrl_vl.tinker.storage import CheckpointStore


def start_vllm_for(model_dir: str, *, max_model_len: int = 4096, max_lora_rank: int = 64, max_loras: int = 4,
                   device: str = "cpu", kv_cache_gib: int = 1, log_dir: str | None = None,
                   max_num_seqs: int = 16) -> ServerHandle:
    """A vLLM server for sampling: LoRA on (every trained sampler checkpoint is an adapter), fp32 on CPU."""
    return start_server(ServerConfig(model=model_dir, served_model_name="base", device=device,
                                     dtype="float32" if device == "cpu" else "auto", max_model_len=max_model_len,
                                     max_num_seqs=max_num_seqs, max_num_batched_tokens=max(2048, max_model_len),
                                     cpu_kv_cache_gib=kv_cache_gib, enable_lora=True, max_lora_rank=max_lora_rank,
                                     max_loras=max_loras, tool_call_parser=None, log_dir=log_dir))


class OwnedVLLM:
    """A vLLM server this process started; `restart()` (async) replaces a dead one and returns its URL."""

    def __init__(self, handle: ServerHandle):
        self.handle = handle

    async def restart(self) -> str:
        self.handle = await asyncio.to_thread(restart_server, self.handle)
        return self.handle.url

    def stop(self) -> None:
        stop_server(self.handle)


def build_service(base_model: str, storage_root: str, *, vllm_url: str | None, vllm_model_name: str = "base",
                  poll_seconds: float = 25.0, max_context_length: int | None = None,
                  owned_vllm: OwnedVLLM | None = None) -> TinkerService:
    store = CheckpointStore(storage_root)
    backend = TrainingBackend(base_model, store)
    if owned_vllm is not None:
        vllm_url = owned_vllm.handle.url
    sampler = VLLMSampler(vllm_url, vllm_model_name,
                          restart=owned_vllm.restart if owned_vllm else None) if vllm_url else None
    return TinkerService(backend, store, sampler, futures=FutureStore(poll_seconds=poll_seconds),
                         max_context_length=max_context_length)


class ServerThread:
    """uvicorn on 127.0.0.1:port in a daemon thread. `stop()` shuts it down."""

    def __init__(self, service: TinkerService, port: int, *, api_key: str | None = None, log_level: str = "warning",
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES):
        self.app = create_app(service, api_key=api_key, max_body_bytes=max_body_bytes)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=port, log_level=log_level))
        self.thread = threading.Thread(target=self.server.run, daemon=True, name="tinker-uvicorn")
        self.url = f"http://127.0.0.1:{port}"

    def start(self, timeout_seconds: float = 60.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/api/v1/healthz", timeout=2.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"tinker server at {self.url} did not come up in {timeout_seconds} s")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
