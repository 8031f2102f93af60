"""Push trained JAX params into running vLLM servers, versioned (`weight_version` = training step).

Transport `reload` (works on CPU and GPU when the server can read the trainer's disk):
  1. params -> HF-named tensors (`models.checkpoint.to_hf_state_dict`) -> one safetensors file in a
     new folder per version under /dev/shm (memory-backed; written once for all servers);
  2. on every server: POST /pause?mode=wait (drains in-flight requests; clears the KV/prefix cache)
     -> POST /collective_rpc reload_weights {weights_path} (the worker also clears encoder and mm
     caches) -> POST /update_weight_version -> POST /reset_prefix_cache, /reset_encoder_cache
     -> POST /resume. Resume always runs once pause succeeded, so a failed reload leaves the server
     serving (with the previous version label) and the trainer gets WeightPushError.
Reloading without a pause crashed vLLM 0.32 ("Encoder cache miss") when an image was seen again, and
a stale prefix cache gave logprobs off by nats (../shared/notes/vllm.md): hence the sequence above.
"""
import asyncio
import dataclasses
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxrl_vl.rollout.client import VLLMClient, VLLMError

WEIGHTS_FILE = "model.safetensors"


class WeightPushError(RuntimeError):
    """A push failed on at least one server; those servers keep serving their previous weights
    label (`weight_version`), which the trainer should treat as stale."""


@dataclasses.dataclass(frozen=True)
class PushResult:
    version: str
    transport: str
    num_tensors: int
    num_bytes: int
    write_seconds: float  # params -> safetensors on /dev/shm
    reload_seconds: float  # pause .. resume, slowest server
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
        try:
            await client.request("POST", "/resume")
            alive = await client.health()
        except VLLMError:
            alive = False
        state = ("resumed with its previous weights version label" if alive else
                 "DIED (vLLM's in-place reload leaves no usable weights on failure); restart it")
        raise WeightPushError(f"{client.base_url}: reload of {folder} as version {version} failed; "
                              f"the server {state}: {error}") from error
    await client.request("POST", "/resume")
    return time.perf_counter() - start


async def server_weight_version(client: VLLMClient) -> str | None:
    return (await client.request("GET", "/weight_info")).get("weight_version")


async def push_state_dict(state: dict[str, np.ndarray], clients: Sequence[VLLMClient], version: str | int, *,
                          root: str = "/dev/shm", keep_folder: bool = False, pause_mode: str = "wait") -> PushResult:
    """Writes `state` once under `root` and reloads it into every server concurrently. The folder
    (a fresh one per version and process) is removed afterwards unless keep_folder."""
    if not clients:
        raise ValueError("push_state_dict: no servers to push to")
    start = time.perf_counter()
    folder = Path(root) / f"jaxrl_vl_weights_{os.getpid()}_v{version}_{time.time_ns()}"
    try:
        num_bytes, write_seconds = write_weights(state, folder)
        results = await asyncio.gather(*(reload_from_folder(c, str(folder), version, pause_mode=pause_mode)
                                         for c in clients), return_exceptions=True)
    finally:
        if not keep_folder:
            shutil.rmtree(folder, ignore_errors=True)
    failures = [(c.base_url, r) for c, r in zip(clients, results) if isinstance(r, BaseException)]
    if failures:
        raise WeightPushError(f"weight push of version {version} failed on {len(failures)} of {len(clients)} "
                              "servers: " + "; ".join(f"{u}: {e}" for u, e in failures))
    return PushResult(version=str(version), transport="reload", num_tensors=len(state), num_bytes=num_bytes,
                      write_seconds=write_seconds, reload_seconds=max(results),
                      total_seconds=time.perf_counter() - start, servers=tuple(c.base_url for c in clients))


async def push_params(params: dict, model_config, clients: Sequence[VLLMClient], version: int, **kwargs) -> PushResult:
    """JAX params (nested, HF-named, fp32) -> every server, labelled `version` (the training step).
    LoRA must be merged first (`models.lora.merge`)."""
    from jaxrl_vl.models.checkpoint import to_hf_state_dict

    state = to_hf_state_dict(params, model_config)
    return await push_state_dict(state, clients, version, **kwargs)


def check_weight_versions(choice: dict, expected_version: str | int) -> bool:
    """True when every token of a generate choice came from `expected_version` (False = stale or
    mixed rollout, e.g. a push landed mid-sample with pause mode "keep")."""
    spans = choice.get("weight_versions") or []
    return bool(spans) and all(span["version"] == str(expected_version) for span in spans)
