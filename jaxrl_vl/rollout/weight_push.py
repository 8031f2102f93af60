"""Push trained JAX params into running vLLM servers, versioned (`weight_version` = training step).

Transport `reload` (works on CPU and GPU when the server can read the trainer's disk):
  1. params -> HF-named tensors (`models.checkpoint.to_hf_state_dict`) -> one safetensors file in a
     new folder per version under /dev/shm (memory-backed; written once for all servers);
  2. on every server: POST /pause?mode=wait (drains in-flight requests; clears the KV/prefix cache)
     -> POST /collective_rpc reload_weights {weights_path} (the worker also clears encoder and mm
     caches) -> POST /update_weight_version -> POST /reset_prefix_cache, /reset_encoder_cache
     -> POST /resume. Resume always runs once pause succeeded and the trainer gets WeightPushError;
     a missing folder is refused before pausing, but a reload that fails inside vLLM 0.32 leaves
     the engine without usable weights (the error says so; `server.restart_server` recovers).
Transport `stream` (no shared disk; the trainer may be on another host, e.g. a Cloud TPU VM):
  the server runs our weight-transfer backend (plugins/vllm_weight_stream, `--weight-transfer-config
  {"backend": "jaxrl_stream"}`, ServerConfig.weight_transfer_backend). Per server: /pause ->
  /start_weight_update -> one POST /update_weights per chunk (a safetensors blob of <= chunk_bytes,
  base64 in the JSON body; one chunk in memory at a time) -> /finish_weight_update {weight_version}
  -> reset caches -> /resume.
LoRA (`push_lora`): the adapter is exported in PEFT format to a NEW folder per version (reusing a
  path left a stale prefix cache) and loaded with POST /v1/load_lora_adapter {load_inplace}; requests
  then name the adapter as their `model`. Server: ServerConfig(enable_lora=True). vLLM 0.32 bug:
  base-model and adapter requests batched together give base requests the adapter, so send only
  adapter traffic to such a server. Or merge (`models.lora.merge`) and `push_params`.
Reloading without a pause crashed vLLM 0.32 ("Encoder cache miss") when an image was seen again, and
a stale prefix cache gave logprobs off by nats (../shared/notes/vllm.md): hence the sequence above.
"""
import asyncio
import base64
import dataclasses
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxrl_vl.rollout.client import VLLMClient, VLLMError

WEIGHTS_FILE = "model.safetensors"
STREAM_CHUNK_BYTES = 4 * 2**20  # measured: 4 MB chunks pushed faster than 64 MB on CPU
TRANSPORTS = ("reload", "stream")


class WeightPushError(RuntimeError):
    """A push failed on at least one server; those servers keep serving their previous weights
    label (`weight_version`), which the trainer should treat as stale."""


@dataclasses.dataclass(frozen=True)
class PushResult:
    version: str
    transport: str
    num_tensors: int
    num_bytes: int
    write_seconds: float  # params -> safetensors on /dev/shm (reload transport; 0 for stream)
    reload_seconds: float  # pause .. resume, slowest server (stream: includes sending the chunks)
    total_seconds: float
    servers: tuple[str, ...]


def write_weights(state: dict[str, np.ndarray], folder: str | os.PathLike) -> tuple[int, float]:
    """Writes `state` ({HF name: array}) as folder/model.safetensors. Returns (bytes, seconds)."""
    from jaxrl_vl.models import safetensors_io

    start = time.perf_counter()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {name: np.ascontiguousarray(np.asarray(value)) for name, value in state.items()}
    safetensors_io.write(str(folder / WEIGHTS_FILE), arrays)
    return sum(a.nbytes for a in arrays.values()), time.perf_counter() - start


async def reload_from_folder(client: VLLMClient, folder: str, version: str | int, *, pause_mode: str = "wait",
                             rpc_timeout_seconds: float = 600.0, folder_is_local: bool = True) -> float:
    """pause -> reload_weights(folder) -> set version -> reset caches -> resume, on one server.
    Returns seconds. Raises WeightPushError: before pausing when the (local) folder holds no
    safetensors (the server keeps serving its weights); after a failed reload the server resumes
    with its previous version label, but vLLM 0.32's in-place reload may have left the engine
    broken (its params are moved to the meta device first): the error then says it died and the
    server needs `restart_server`."""
    start = time.perf_counter()
    if folder_is_local and not any(Path(folder).glob("*.safetensors")):
        raise WeightPushError(f"{client.base_url}: no *.safetensors in {folder}; nothing pushed, "
                              "the server keeps its weights")
    try:
        await client.request("POST", "/pause", params={"mode": pause_mode, "clear_cache": "true"})
    except VLLMError as error:
        raise WeightPushError(f"{client.base_url}: pause failed, weights unchanged: {error}") from error
    try:
        await client.request("POST", "/collective_rpc", json={
            "method": "reload_weights", "kwargs": {"weights_path": str(folder)}, "timeout": rpc_timeout_seconds})
        await client.request("POST", "/update_weight_version", json={"new_version": str(version)})
        await client.request("POST", "/reset_prefix_cache")
        await client.request("POST", "/reset_encoder_cache")
    except VLLMError as error:
        await _resume_after_failure(client, f"reload of {folder} as version {version}", error)
    await client.request("POST", "/resume")
    return time.perf_counter() - start


def state_chunks(state: dict[str, np.ndarray], chunk_bytes: int):
    """Yields {name: array} groups of <= chunk_bytes in name order (a larger tensor goes alone),
    so consecutive tensors of one layer (q, k, v) travel together."""
    chunk, size = {}, 0
    for name in sorted(state):
        array = np.asarray(state[name])
        if chunk and size + array.nbytes > chunk_bytes:
            yield chunk
            chunk, size = {}, 0
        chunk[name] = array
        size += array.nbytes
    if chunk:
        yield chunk


def _encode_chunk(chunk: dict[str, np.ndarray]) -> str:
    from safetensors.numpy import save

    arrays = {n: np.ascontiguousarray(a if a.dtype in (np.float32, np.float16) else a.astype(np.float32))
              for n, a in chunk.items()}
    return base64.b64encode(save(arrays)).decode("ascii")


async def stream_to_server(client: VLLMClient, state: dict[str, np.ndarray], version: str | int, *,
                           chunk_bytes: int = STREAM_CHUNK_BYTES, pause_mode: str = "wait") -> float:
    """The `stream` transport on one server (see module doc). Returns seconds; raises WeightPushError."""
    start = time.perf_counter()
    try:
        if not getattr(client, "_jaxrl_stream_ready", False):
            await client.request("POST", "/init_weight_transfer_engine", json={"init_info": {"protocol_version": 1}})
            client._jaxrl_stream_ready = True
        await client.request("POST", "/pause", params={"mode": pause_mode, "clear_cache": "true"})
    except VLLMError as error:
        raise WeightPushError(f"{client.base_url}: stream push could not start (is the server running with "
                              f"weight_transfer_backend='jaxrl_stream'?); weights unchanged: {error}") from error
    try:
        await client.request("POST", "/start_weight_update")
        for index, chunk in enumerate(state_chunks(state, chunk_bytes)):
            update = {"safetensors_b64": _encode_chunk(chunk), "chunk_index": index}
            await client.request("POST", "/update_weights", json={"update_info": update})
        await client.request("POST", "/finish_weight_update", json={"weight_version": str(version)})
        await client.request("POST", "/reset_prefix_cache")
        await client.request("POST", "/reset_encoder_cache")
    except VLLMError as error:
        await _resume_after_failure(client, f"stream push as version {version}", error)
    await client.request("POST", "/resume")
    return time.perf_counter() - start


async def _resume_after_failure(client: VLLMClient, what: str, error: Exception):
    try:
        await client.request("POST", "/resume")
        alive = await client.health()
    except VLLMError:
        alive = False
    state = ("resumed with its previous weights version label" if alive else
             "DIED (vLLM's in-place reload leaves no usable weights on failure); restart it")
    raise WeightPushError(f"{client.base_url}: {what} failed; the server {state}: {error}") from error


async def server_weight_version(client: VLLMClient) -> str | None:
    return (await client.request("GET", "/weight_info")).get("weight_version")


async def push_state_dict(state: dict[str, np.ndarray], clients: Sequence[VLLMClient], version: str | int, *,
                          transport: str = "reload", root: str = "/dev/shm", keep_folder: bool = False,
                          pause_mode: str = "wait", chunk_bytes: int = STREAM_CHUNK_BYTES) -> PushResult:
    """Pushes `state` ({HF name: array}) into every server concurrently, labelled `version`.
    reload: written once under `root` (a fresh folder, removed afterwards unless keep_folder).
    stream: sent over HTTP in chunks of <= chunk_bytes."""
    if transport not in TRANSPORTS:
        raise ValueError(f"transport={transport!r}: expected one of {TRANSPORTS}")
    if not clients:
        raise ValueError("push_state_dict: no servers to push to")
    start = time.perf_counter()
    num_bytes, write_seconds = sum(np.asarray(v).nbytes for v in state.values()), 0.0
    folder = Path(root) / f"jaxrl_vl_weights_{os.getpid()}_v{version}_{time.time_ns()}"
    try:
        if transport == "reload":
            num_bytes, write_seconds = write_weights(state, folder)
            pushes = [reload_from_folder(c, str(folder), version, pause_mode=pause_mode) for c in clients]
        else:
            pushes = [stream_to_server(c, state, version, chunk_bytes=chunk_bytes, pause_mode=pause_mode)
                      for c in clients]
        results = await asyncio.gather(*pushes, return_exceptions=True)
    finally:
        if not keep_folder:
            shutil.rmtree(folder, ignore_errors=True)
    failures = [(c.base_url, r) for c, r in zip(clients, results) if isinstance(r, BaseException)]
    if failures:
        raise WeightPushError(f"weight push ({transport}) of version {version} failed on {len(failures)} of "
                              f"{len(clients)} servers: " + "; ".join(f"{u}: {e}" for u, e in failures))
    return PushResult(version=str(version), transport=transport, num_tensors=len(state), num_bytes=num_bytes,
                      write_seconds=write_seconds, reload_seconds=max(results),
                      total_seconds=time.perf_counter() - start, servers=tuple(c.base_url for c in clients))


async def push_params(params: dict, model_config, clients: Sequence[VLLMClient], version: int, **kwargs) -> PushResult:
    """JAX params (nested, HF-named, fp32) -> every server, labelled `version` (the training step).
    LoRA must be merged first (`models.lora.merge`)."""
    from jaxrl_vl.models.checkpoint import to_hf_state_dict

    state = to_hf_state_dict(params, model_config)
    return await push_state_dict(state, clients, version, **kwargs)


async def push_lora(lora: dict, lora_config, model_config, clients: Sequence[VLLMClient], version: int, *,
                    lora_name: str = "policy-lora", root: str = "/dev/shm") -> str:
    """Exports the adapter (PEFT) to a fresh folder under `root` and loads it into every server as
    `lora_name` (replacing the previous version in place), then clears prefix caches. Returns the
    folder: vLLM may re-read it, so the caller removes it once a newer version is loaded."""
    from jaxrl_vl.models.lora import export_peft

    folder = Path(root) / f"jaxrl_vl_lora_{os.getpid()}_v{version}_{time.time_ns()}"
    export_peft(lora, lora_config, model_config, str(folder))

    async def load(client: VLLMClient):
        await client.request("POST", "/v1/load_lora_adapter",
                             json={"lora_name": lora_name, "lora_path": str(folder), "load_inplace": True})
        await client.request("POST", "/reset_prefix_cache")

    results = await asyncio.gather(*(load(c) for c in clients), return_exceptions=True)
    failures = [(c.base_url, r) for c, r in zip(clients, results) if isinstance(r, BaseException)]
    if failures:
        raise WeightPushError(f"LoRA push of version {version} failed on: "
                              + "; ".join(f"{u}: {e}" for u, e in failures))
    return str(folder)


def check_weight_versions(choice: dict, expected_version: str | int) -> bool:
    """True when every token of a generate choice came from `expected_version` (False = stale or
    mixed rollout, e.g. a push landed mid-sample with pause mode "keep")."""
    spans = choice.get("weight_versions") or []
    return bool(spans) and all(span["version"] == str(expected_version) for span in spans)
