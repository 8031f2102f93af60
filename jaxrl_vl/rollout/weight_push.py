"""Push trained JAX params into running vLLM servers, versioned (`weight_version` = training step).

Transport `reload` (works on CPU and GPU when the server can read the trainer's disk):
  1. params -> HF-named tensors (`models.checkpoint.to_hf_state_dict`) -> one safetensors file in a
     new folder per version under /dev/shm (memory-backed; written once for all servers);
  2. on every server: one POST /jaxrl/weights/commit {weights_path} (our plugin's route, which runs
     the steps below server-side: weight_routes.py; a stock server answers 404 and gets the calls).
     On an idle engine the route makes ONE engine-core call instead (plugin engine_core.py): the
     worker's reload, the prefix and encoder cache resets and the version, between two engine steps
     (nothing is scheduled meanwhile, so no pause is needed). With requests running or queued:
     POST /pause?mode=wait (drains in-flight requests; clears the KV/prefix cache)
     -> POST /collective_rpc reload_weights {weights_path} -> POST /update_weight_version -> POST /reset_prefix_cache, /reset_encoder_cache
     -> POST /resume. Resume always runs once pause succeeded and the trainer gets WeightPushError;
     a folder that fails `validate_weights_folder` (missing, truncated, or not the tensors written)
     is refused before pausing, but a reload that fails inside vLLM 0.32 leaves the engine without
     usable weights (the error says so; `server.restart_server` recovers).
Transport `stream` (no shared disk; the trainer may be on another host, e.g. a Cloud TPU VM):
  the server runs our weight-transfer backend (plugins/vllm_weight_stream, `--weight-transfer-config
  {"backend": "jaxrl_stream"}`, ServerConfig.weight_transfer_backend). Per server, with our plugin's
  routes (weight_routes.py): each chunk as raw safetensors bytes to /jaxrl/weights/stage (length and
  crc32 checked on arrival; the engine keeps serving), then one /jaxrl/weights/commit with the manifest
  runs the sequence below server-side. Without the routes (404), over vLLM's own: /pause ->
  /start_weight_update -> one POST /update_weights per chunk (a safetensors blob of <= chunk_bytes,
  base64 in the JSON body, with its byte count and crc32; one chunk in memory at a time) -> a commit
  /update_weights {"commit": manifest of names, dtypes, shapes, bytes, chunk count} ->
  /finish_weight_update {weight_version} -> reset caches -> /resume. The receiver stages the chunks
  and swaps them into the model only once the commit matches what arrived and covers the served
  checkpoint; otherwise the server keeps its weights and version and the trainer gets WeightPushError.
Transport `shm` (same host; the fastest): the server runs our worker extension
  (ServerConfig.shm_weights) and its model reads two shared-memory slots laid out as vLLM's own
  parameters; the trainer copies the tensors into the slot not in use and one commit makes the engine
  (if busy: pause,) adopt that slot (no server-side copy; only the CPU linear layers are re-packed from it, as
  vLLM's own load does), set the version (and resume). A state that does not match, or a write that did
  not finish, is refused: the server keeps its weights and version. Details: weight_shm.py and
  plugins/vllm_weight_stream/jaxrl_vl_vllm_plugin/shm_worker.py.
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
import json
import os
import shutil
import time
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxrl_vl.rollout import weight_routes
from jaxrl_vl.rollout.client import VLLMClient, VLLMError

WEIGHTS_FILE = "model.safetensors"
# Raw chunks (weight_routes.py) are sent from the arrays' own memory and staged by the server, so
# their size bounds no memory here; fewer chunks cost fewer round trips.
STREAM_CHUNK_BYTES = 64 * 2**20
INLINE_CHUNK_BYTES = 4 * 2**20  # base64-in-JSON fallback: 4 MB chunks pushed faster than 64 MB on CPU
TRANSPORTS = ("reload", "stream", "shm")


class WeightPushError(RuntimeError):
    """A push failed on at least one server; those servers keep serving their previous weights
    label (`weight_version`), which the trainer should treat as stale."""


@dataclasses.dataclass(frozen=True)
class PushResult:
    version: str
    transport: str
    num_tensors: int
    num_bytes: int
    write_seconds: float  # params -> safetensors on /dev/shm (reload) or into the slots (shm); 0 for stream
    reload_seconds: float  # pause .. resume, slowest server (stream: includes sending the chunks)
    total_seconds: float
    servers: tuple[str, ...]
    # slowest server's seconds per phase: client-side (checksum, send) and as the server measured them
    # (server_pause, server_load, server_version, server_resume); empty on the fallback path
    phase_seconds: dict = dataclasses.field(default_factory=dict)


def write_weights(state: dict[str, np.ndarray], folder: str | os.PathLike) -> tuple[int, float]:
    """Writes `state` ({HF name: array}) as folder/model.safetensors. Returns (bytes, seconds)."""
    from jaxrl_vl.models import safetensors_io

    start = time.perf_counter()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {name: np.ascontiguousarray(np.asarray(value)) for name, value in state.items()}
    safetensors_io.write(str(folder / WEIGHTS_FILE), arrays)
    return sum(a.nbytes for a in arrays.values()), time.perf_counter() - start


_SAFETENSORS_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
                       "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}
_SAFETENSORS_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                         "BOOL": 1}


def validate_weights_folder(folder: str | os.PathLike,
                            expected: dict[str, tuple[str, tuple[int, ...]]] | None = None) -> None:
    """Checks a folder of safetensors files before a server loads it (vLLM 0.32's in-place reload
    leaves no usable weights when a file fails half way): every file's header parses and its data
    region has exactly the bytes the header describes (no truncation), no tensor appears twice,
    and with `expected` ({name: (numpy dtype name, shape)}) exactly those tensors are present with
    those dtypes and shapes. Raises WeightPushError naming the first problem."""
    found: dict[str, tuple[str, tuple[int, ...]]] = {}
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise WeightPushError(f"no *.safetensors in {folder}")
    for path in files:
        size = path.stat().st_size
        try:
            with open(path, "rb") as f:
                header_len = int.from_bytes(f.read(8), "little")
                if not 2 <= header_len <= size - 8:
                    raise ValueError(f"header length {header_len} does not fit the file's {size} bytes")
                header = json.loads(f.read(header_len))
            end = 0
            for name, entry in header.items():
                if name == "__metadata__":
                    continue
                dtype, shape, (begin, stop) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
                if stop - begin != _SAFETENSORS_ITEMSIZE.get(dtype, 0) * int(np.prod(shape, dtype=np.int64)):
                    raise ValueError(f"tensor {name}: {stop - begin} bytes for {dtype}{list(shape)}")
                if name in found:
                    raise ValueError(f"tensor {name} appears twice")
                found[name], end = (dtype, shape), max(end, stop)
            if size - 8 - header_len != end:
                raise ValueError(f"data region has {size - 8 - header_len} bytes, the header describes {end} "
                                 "(truncated or padded)")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
            raise WeightPushError(f"{path} is not a complete safetensors file: {error}") from error
    if expected is not None:
        want = {n: (_SAFETENSORS_DTYPES.get(d, d), tuple(s)) for n, (d, s) in expected.items()}
        missing, extra = sorted(set(want) - set(found)), sorted(set(found) - set(want))
        if missing or extra:
            raise WeightPushError(f"{folder}: tensors missing {missing[:10]}, unexpected {extra[:10]}")
        wrong = [f"{n}: {found[n]} != {want[n]}" for n in sorted(want) if found[n] != want[n]]
        if wrong:
            raise WeightPushError(f"{folder}: dtype/shape differ: {wrong[:5]}")


async def reload_from_folder(client: VLLMClient, folder: str, version: str | int, *, pause_mode: str = "wait",
                             rpc_timeout_seconds: float = 600.0, folder_is_local: bool = True,
                             expected: dict[str, tuple[str, tuple[int, ...]]] | None = None) -> float:
    """pause -> reload_weights(folder) -> set version -> reset caches -> resume, on one server.
    Returns seconds. Raises WeightPushError: before pausing when the (local) folder fails
    `validate_weights_folder` (missing, truncated or corrupt files; with `expected`, missing or
    misshapen tensors): the server keeps serving its weights and version. After a failed reload
    inside vLLM the server resumes with its previous version label, but vLLM 0.32's in-place
    reload may have left the engine broken (its params are moved to the meta device first): the
    error then says it died and the server needs `restart_server`."""
    return (await _reload(client, folder, version, pause_mode=pause_mode, rpc_timeout_seconds=rpc_timeout_seconds,
                          folder_is_local=folder_is_local, expected=expected))["total"]


async def _reload(client: VLLMClient, folder: str, version: str | int, *, pause_mode: str, rpc_timeout_seconds: float,
                  folder_is_local: bool, expected, plugin_routes: bool = True) -> dict[str, float]:
    """reload_from_folder's work; returns seconds per phase and "total"."""
    start = time.perf_counter()
    if folder_is_local:
        try:
            validate_weights_folder(folder, expected)
        except WeightPushError as error:
            raise WeightPushError(f"{client.base_url}: {error}; refused before loading: nothing pushed, the "
                                  "server keeps its weights and version") from error
    if plugin_routes:  # all steps in one request (weight_routes.py)
        try:
            phases = await weight_routes.commit(client, version, pause_mode=pause_mode, weights_path=str(folder))
            return {**phases, "total": time.perf_counter() - start}
        except weight_routes.PushRejected as error:
            raise WeightPushError(str(error)) from error
        except weight_routes.RoutesMissing:
            pass  # a stock vLLM server: its own routes, one call per step
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
    return {"total": time.perf_counter() - start}


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


def _wire_arrays(chunk: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {n: np.ascontiguousarray(a if a.dtype in (np.float32, np.float16) else a.astype(np.float32))
            for n, a in chunk.items()}


def _chunk_message(index: int, arrays: dict[str, np.ndarray]) -> dict:
    """One /update_weights body of the stream transport: the chunk as safetensors bytes (base64)
    with their length and crc32, so the receiver can tell a truncated or corrupted chunk."""
    from safetensors.numpy import save

    blob = save(arrays)
    return {"safetensors_b64": base64.b64encode(blob).decode("ascii"), "chunk_index": index,
            "num_bytes": len(blob), "crc32": zlib.crc32(blob)}


def _commit_message(sent: dict[str, tuple[str, list[int], int]], num_chunks: int) -> dict:
    """The last /update_weights body: what was sent ({name: (dtype, shape, bytes)}). The receiver
    swaps the staged tensors into the model only if exactly this arrived (plugins/vllm_weight_stream)."""
    return {"commit": {"num_chunks": num_chunks, "num_bytes": sum(b for _, _, b in sent.values()),
                       "tensors": {n: [dtype, shape] for n, (dtype, shape, _) in sent.items()}}}


async def _start_stream_session(client: VLLMClient) -> None:
    """POST /start_weight_update; a session left open by a trainer that died mid-stream is first
    aborted (the receiver drops what it staged; the model never saw it)."""
    try:
        await client.request("POST", "/start_weight_update")
    except VLLMError as error:
        if "already active" not in str(error):
            raise
        try:
            await client.request("POST", "/update_weights", json={"update_info": {"abort": True}})
        except VLLMError:
            pass  # the abort answers with an error by design: it is how vLLM's worker ends a session
        await client.request("POST", "/start_weight_update")


async def stream_to_server(client: VLLMClient, state: dict[str, np.ndarray], version: str | int, *,
                           chunk_bytes: int = STREAM_CHUNK_BYTES, pause_mode: str = "wait") -> float:
    """The `stream` transport on one server (see module doc). Returns seconds; raises WeightPushError."""
    return (await _stream(client, state, version, chunk_bytes=chunk_bytes, pause_mode=pause_mode))["total"]


async def _stream(client: VLLMClient, state: dict[str, np.ndarray], version: str | int, *, chunk_bytes: int,
                  pause_mode: str, plugin_routes: bool = True) -> dict[str, float]:
    """stream_to_server's work: the plugin's raw routes, else vLLM's /update_weights with inline chunks.
    Returns seconds per phase and "total"."""
    start = time.perf_counter()
    if plugin_routes:
        try:
            phases = await _stream_raw(client, state, version, chunk_bytes=chunk_bytes, pause_mode=pause_mode)
            return {**phases, "total": time.perf_counter() - start}
        except weight_routes.PushRejected as error:
            raise WeightPushError(str(error)) from error
        except weight_routes.RoutesMissing:
            pass
    chunk_bytes = min(chunk_bytes, INLINE_CHUNK_BYTES)
    try:
        if not getattr(client, "_jaxrl_stream_ready", False):
            await client.request("POST", "/init_weight_transfer_engine", json={"init_info": {"protocol_version": 1}})
            client._jaxrl_stream_ready = True
        await client.request("POST", "/pause", params={"mode": pause_mode, "clear_cache": "true"})
    except VLLMError as error:
        raise WeightPushError(f"{client.base_url}: stream push could not start (is the server running with "
                              f"weight_transfer_backend='jaxrl_stream'?); weights unchanged: {error}") from error
    try:
        await _start_stream_session(client)
        sent: dict[str, tuple[str, list[int], int]] = {}
        num_chunks = 0
        for index, chunk in enumerate(state_chunks(state, chunk_bytes)):
            arrays = _wire_arrays(chunk)
            await client.request("POST", "/update_weights", json={"update_info": _chunk_message(index, arrays)})
            sent.update({n: (str(a.dtype), list(a.shape), a.nbytes) for n, a in arrays.items()})
            num_chunks += 1
        await client.request("POST", "/update_weights", json={"update_info": _commit_message(sent, num_chunks)})
        await client.request("POST", "/finish_weight_update", json={"weight_version": str(version)})
        await client.request("POST", "/reset_prefix_cache")
        await client.request("POST", "/reset_encoder_cache")
    except VLLMError as error:
        await _resume_after_failure(client, f"stream push as version {version}", error)
    await client.request("POST", "/resume")
    return {"total": time.perf_counter() - start}


async def _stream_raw(client: VLLMClient, state: dict[str, np.ndarray], version: str | int, *, chunk_bytes: int,
                      pause_mode: str) -> dict[str, float]:
    """Stages every chunk (the server keeps serving), then commits the manifest (pause, validate and
    load, version, resume). A refused chunk leaves the server untouched."""
    phases: dict[str, float] = {}
    sent: dict[str, tuple[str, list[int], int]] = {}
    num_chunks = 0
    for index, chunk in enumerate(state_chunks(state, chunk_bytes)):
        arrays = _wire_arrays(chunk)
        for phase, seconds in (await weight_routes.stage_chunk(client, index, arrays)).items():
            phases[phase] = phases.get(phase, 0.0) + seconds
        sent.update({n: (str(a.dtype), list(a.shape), a.nbytes) for n, a in arrays.items()})
        num_chunks += 1
    manifest = _commit_message(sent, num_chunks)["commit"]
    phases.update(await weight_routes.commit(client, version, pause_mode=pause_mode, num_chunks=num_chunks,
                                             manifest=manifest))
    return phases


async def _shm(client: VLLMClient, state: dict[str, np.ndarray], version: str | int, *,
               pause_mode: str) -> dict[str, float]:
    from jaxrl_vl.rollout import weight_shm

    start = time.perf_counter()
    try:
        phases = await weight_shm.push(client, state, version, pause_mode=pause_mode)
    except weight_routes.PushRejected as error:
        raise WeightPushError(str(error)) from error
    except weight_routes.RoutesMissing as error:
        raise WeightPushError(f"{client.base_url}: the shm transport needs our plugin's routes and a server "
                              "started with ServerConfig.shm_weights=True; weights unchanged") from error
    return {**phases, "total": time.perf_counter() - start}


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
                          pause_mode: str = "wait", chunk_bytes: int = STREAM_CHUNK_BYTES,
                          plugin_routes: bool = True) -> PushResult:
    """Pushes `state` ({HF name: array}) into every server concurrently, labelled `version`.
    reload: written once under `root` (a fresh folder, removed afterwards unless keep_folder).
    stream: sent over HTTP in chunks of <= chunk_bytes.
    shm: copied into each server's free shared-memory slot (same host; needs the plugin's routes).
    plugin_routes=False: only vLLM's own routes, as for a server without our plugin's."""
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
            expected = {n: (str(np.asarray(a).dtype), np.shape(a)) for n, a in state.items()}
            pushes = [_reload(c, str(folder), version, pause_mode=pause_mode, rpc_timeout_seconds=600.0,
                              folder_is_local=True, expected=expected, plugin_routes=plugin_routes) for c in clients]
        elif transport == "shm":
            if not plugin_routes:
                raise ValueError("transport='shm' has no stock-route fallback (plugin_routes=False)")
            pushes = [_shm(c, state, version, pause_mode=pause_mode) for c in clients]
        else:
            pushes = [_stream(c, state, version, chunk_bytes=chunk_bytes, pause_mode=pause_mode,
                              plugin_routes=plugin_routes) for c in clients]
        results = await asyncio.gather(*pushes, return_exceptions=True)
    finally:
        if not keep_folder:
            shutil.rmtree(folder, ignore_errors=True)
    failures = [(c.base_url, r) for c, r in zip(clients, results) if isinstance(r, BaseException)]
    if failures:
        raise WeightPushError(f"weight push ({transport}) of version {version} failed on {len(failures)} of "
                              f"{len(clients)} servers: " + "; ".join(f"{u}: {e}" for u, e in failures))
    slowest = max(results, key=lambda phases: phases["total"])
    if transport == "shm":  # each server has its own slots: one write per server
        write_seconds = sum(phases["write"] for phases in results)
    return PushResult(version=str(version), transport=transport, num_tensors=len(state), num_bytes=num_bytes,
                      write_seconds=write_seconds, reload_seconds=slowest["total"],
                      total_seconds=time.perf_counter() - start, servers=tuple(c.base_url for c in clients),
                      phase_seconds={k: v for k, v in slowest.items() if k != "total"})


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
