"""vLLM endpoint plugin: one-request weight pushes (the fast path of both transports).

Why: the stock sequence (/pause, /collective_rpc or the /update_weights chunks, /update_weight_version,
/reset_*_cache, /resume) costs one HTTP call and one engine round trip per step, base64 + JSON for
the bytes, and /pause alone sleeps 20 ms (AsyncLLM.pause_generation, "not required for
correctness"). Here the trainer sends raw bytes and one commit; the steps run server-side.

    POST /jaxrl/weights/stage?index=I&num_bytes=N[&crc32=C]   body: one chunk, a safetensors file's raw
        bytes. Written as it arrives (bounded memory) into staging slot I, an anonymous shared-memory
        file (memfd: the engine's worker maps it; freed when this server exits; reused by the next
        push, so its pages are already faulted in). The byte count and crc32 are checked on arrival.
        The engine keeps serving meanwhile.
    POST /jaxrl/weights/commit  {"version", "pause_mode", "num_chunks", "manifest"}  (stream: the slots
        0..num_chunks-1 go through the jaxrl_stream backend, which validates them against the
        manifest and the served model before it touches the model, engine.py)
                            or  {"version", "pause_mode", "weights_path"}  (reload: vLLM's reload_weights
        of a folder the trainer wrote on this host)
                            or  {"version", "pause_mode", "shm": {"slot", "nonce", "layout_id"}}  (shm: the
        worker adopts the slot the trainer wrote, shm_worker.py)
        -> pause, load, set version, resume; answers the server-side seconds of each phase. reload and shm
        on an idle engine: load, cache resets and version in one engine-core call (engine_core.py).
    POST /jaxrl/weights/shm/layout  {"tensors": {name: [dtype, shape]}}  (shm transport, first push): the
        worker (paused meanwhile) works out where each pushed tensor goes in its two shared-memory
        slots and answers their paths and the copy runs (shm_worker.py).

Enabled by VLLM_PLUGINS naming `jaxrl_vl_weight_push` (vLLM loads endpoint plugins only when
allowlisted; jaxrl_vl.rollout.server sets it). Linux only (memfd). Routes are covered by the same
auth middleware as every other route (launch/vllm_token_auth.py).
"""
import asyncio
import os
import time
import zlib
from typing import Literal

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from jaxrl_vl_vllm_plugin import engine_core

PLUGIN_NAME = "jaxrl_vl_weight_push"
STREAM_BACKEND = "jaxrl_stream"

router = APIRouter()


class CommitRequest(BaseModel):
    version: str
    pause_mode: Literal["abort", "wait", "keep"] = "wait"
    num_chunks: int = 0  # stream: slots 0..num_chunks-1, staged since the last commit
    manifest: dict | None = None  # stream: the jaxrl_stream commit manifest (engine.py)
    weights_path: str | None = None  # reload: a folder of safetensors on this host
    shm: dict | None = None  # shm: {"slot", "nonce", "layout_id"} (shm_worker.ShmWeightsWorker.jaxrl_shm_commit)


class ShmLayoutRequest(BaseModel):
    tensors: dict[str, tuple[str, list[int]]]  # {checkpoint name: (numpy dtype, shape)} the trainer pushes


class _Receiver:
    """Staging slots and the push lock of one API server."""

    def __init__(self, engine):
        self.engine = engine
        self.lock = asyncio.Lock()  # one push at a time: a commit reads the slots a stage writes
        self.slot_fds: dict[int, int] = {}
        self.staged: dict[int, int] = {}  # slot -> bytes staged since the last commit

    def slot(self, index: int) -> tuple[int, str]:
        if index not in self.slot_fds:
            self.slot_fds[index] = os.memfd_create(f"jaxrl_vl_weights_{index}")
        return self.slot_fds[index], f"/proc/{os.getpid()}/fd/{self.slot_fds[index]}"

    @property
    def has_stream_backend(self) -> bool:
        config = getattr(self.engine.vllm_config, "weight_transfer_config", None)
        return config is not None and config.backend == STREAM_BACKEND


def _receiver(request: Request) -> _Receiver:
    return request.app.state.jaxrl_weight_push


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message})


@router.post("/jaxrl/weights/stage")
async def stage(request: Request, index: int, num_bytes: int, crc32: int | None = None):
    receiver = _receiver(request)
    if not 0 <= index < 4096 or num_bytes < 0:
        return _error(400, f"index={index}, num_bytes={num_bytes}: expected 0 <= index < 4096 and num_bytes >= 0")
    start = time.perf_counter()
    async with receiver.lock:
        receiver.staged.pop(index, None)
        fd, _ = receiver.slot(index)
        offset, checksum = 0, 0
        async for piece in request.stream():
            if offset + len(piece) > num_bytes:
                return _error(400, f"chunk {index}: more than the declared {num_bytes} bytes arrived")
            view = memoryview(piece)
            while view:  # pwrite may write less than asked
                written = os.pwrite(fd, view, offset)
                view, offset = view[written:], offset + written
            if crc32 is not None:
                checksum = zlib.crc32(piece, checksum)
        if offset != num_bytes:
            return _error(400, f"chunk {index}: {offset} bytes arrived, {num_bytes} were declared (truncated)")
        if crc32 is not None and checksum != crc32:
            return _error(400, f"chunk {index}: crc32 mismatch (corrupted in transit)")
        if os.fstat(fd).st_size > num_bytes:
            os.ftruncate(fd, num_bytes)  # shrink only: a slot that keeps its size keeps its pages
        receiver.staged[index] = num_bytes
    return JSONResponse({"index": index, "num_bytes": num_bytes, "seconds": time.perf_counter() - start})


@router.post("/jaxrl/weights/commit")
async def commit(request: Request, body: CommitRequest):
    handler_start = time.perf_counter()
    receiver, engine = _receiver(request), _receiver(request).engine
    if sum(x is not None for x in (body.weights_path, body.manifest, body.shm)) != 1:
        return _error(400, "commit: give one of `weights_path` (reload), `manifest` with `num_chunks` (stream) "
                           "or `shm` (shm)")
    if body.manifest is not None and not receiver.has_stream_backend:
        return _error(400, f"commit: stream pushes need the server started with --weight-transfer-config "
                           f"'{{\"backend\": \"{STREAM_BACKEND}\"}}'")
    async with receiver.lock:
        staged, receiver.staged = receiver.staged, {}  # a failed commit must not be replayed from old slots
        missing = [i for i in range(body.num_chunks) if i not in staged]
        if body.manifest is not None and missing:
            return _error(400, f"jaxrl_stream: incomplete push: {body.num_chunks - len(missing)} of "
                               f"{body.num_chunks} chunks staged (missing {missing[:10]}); model unchanged")
        seconds, mark = {}, time.perf_counter()

        def lap(name: str):
            nonlocal mark
            now = time.perf_counter()
            seconds[name], mark = now - mark, now

        # reload and shm are one worker call: on an idle engine, one engine-core call that also resets the
        # caches and sets the version (engine_core.py: no pause, ~3 fewer round trips); else the usual way
        worker_call = None if body.manifest is not None else (
            ("jaxrl_shm_commit", body.shm) if body.shm is not None else
            ("reload_weights", {"weights_path": body.weights_path}))
        if worker_call is not None:
            try:
                idle = await engine.engine_core.call_utility_async(engine_core.METHOD, *worker_call, body.version)
            except Exception as error:  # noqa: BLE001 - reported to the trainer with the server's state
                return await _failed(engine, body.version, error)
            if idle["loaded"]:
                lap("load")
                _note_worker(seconds, idle["result"])
                seconds["handler"] = time.perf_counter() - handler_start
                return JSONResponse({"weight_version": body.version, "seconds": seconds})
        # Busy: AsyncLLM.pause_generation minus its trailing 20 ms sleep (vllm/v1/engine/async_llm.py: "not
        # required for correctness"). With clear_cache the engine drops the prefix, mm and encoder
        # caches once drained; nothing is scheduled again before resume.
        await engine.renderer.clear_mm_cache_async()
        await engine.engine_core.pause_scheduler_async(mode=body.pause_mode, clear_cache=True)
        lap("pause")
        try:
            if body.manifest is not None:
                await _load_staged(receiver, body, staged)
            else:
                method, kwargs = worker_call
                _note_worker(seconds, (await engine.collective_rpc(method, kwargs=kwargs))[0])
            lap("load")
            await engine.update_weight_version(body.version)
            if body.pause_mode == "keep":  # frozen requests resume: their cached prefixes are stale
                await engine.reset_prefix_cache()
                await engine.reset_encoder_cache()
            lap("version")
        except Exception as error:  # noqa: BLE001 - reported to the trainer with the server's state
            return await _failed(engine, body.version, error)
        await engine.resume_generation()
        lap("resume")
    seconds["handler"] = time.perf_counter() - handler_start
    return JSONResponse({"weight_version": body.version, "seconds": seconds})


def _note_worker(seconds: dict, result) -> None:
    if isinstance(result, dict) and "seconds" in result:  # shm_worker.ShmWeightsWorker.jaxrl_shm_commit
        seconds.update(worker=result["seconds"], worker_swap=result["swap_seconds"],
                       worker_pack=result["pack_seconds"])


async def _failed(engine, version: str, error: Exception) -> JSONResponse:
    await engine.resume_generation()  # (not paused on the idle path: then a no-op)
    old_version = await engine.get_weight_version()  # only set after a successful load
    state = ("resumed with its previous weights and version" if not engine.errored else
             "DIED (vLLM's in-place reload leaves no usable weights on failure); restart it")
    return _error(500, f"weight push as version {version} failed; the server {state} "
                       f"(weight_version {old_version}): {error}")


@router.post("/jaxrl/weights/shm/layout")
async def shm_layout(request: Request, body: ShmLayoutRequest):
    receiver, engine = _receiver(request), _receiver(request).engine
    async with receiver.lock:
        # the worker swaps scratch tensors into the model while it probes: nothing may run meanwhile
        await engine.engine_core.pause_scheduler_async(mode="wait", clear_cache=False)
        try:
            layout = (await engine.collective_rpc("jaxrl_shm_layout", kwargs={"tensors": body.tensors}))[0]
        except Exception as error:  # noqa: BLE001 - reported to the trainer; the model is untouched
            return _error(400, f"shm layout: {error} (a server without the worker extension lacks "
                               "jaxrl_shm_layout: start it with ServerConfig.shm_weights=True)")
        finally:
            await engine.resume_generation()
    return JSONResponse(layout)


async def _load_staged(receiver: _Receiver, body: CommitRequest, staged: dict[int, int]) -> None:
    engine = receiver.engine
    try:
        await engine.collective_rpc("start_weight_update")
    except Exception as error:  # noqa: BLE001
        if "already active" not in str(error):
            raise
        # a session left open by a trainer that died mid-stream (inline protocol): end it, start anew
        try:
            await engine.collective_rpc("update_weights", kwargs={"update_info": {"abort": True}})
        except Exception:  # noqa: BLE001 - the abort raises by design: that is how the worker ends a session
            pass
        await engine.collective_rpc("start_weight_update")
    for index in range(body.num_chunks):
        info = {"staged_path": receiver.slot(index)[1], "chunk_index": index, "num_bytes": staged[index]}
        await engine.collective_rpc("update_weights", kwargs={"update_info": info})
    await engine.collective_rpc("update_weights", kwargs={"update_info": {"commit": body.manifest}})
    await engine.collective_rpc("finish_weight_update")


class WeightPushRoutes:
    """The `vllm.endpoint_plugins` entry (vllm/plugins/endpoint_plugins/interface.py)."""

    name = PLUGIN_NAME
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        app.include_router(router)

    async def init_state(self, engine_client, state, args) -> None:
        state.jaxrl_weight_push = _Receiver(engine_client)
