"""Client of the one-request weight-push routes (plugins/vllm_weight_stream/jaxrl_vl_vllm_plugin/routes.py).

The fast path of the transports in weight_push.py (`shm`: weight_shm.py, which also uses commit):
- stream: each chunk goes as raw safetensors bytes (a small JSON header, then the arrays' own
  memory: no base64, no JSON, no copy of the tensors on this side) to POST /jaxrl/weights/stage,
  with its length and crc32; then one POST /jaxrl/weights/commit with the manifest does pause, load,
  version and resume server-side. The engine keeps serving while the bytes travel.
- reload: one POST /jaxrl/weights/commit {weights_path} instead of five calls.
A server without the routes (a stock `vllm serve`, VLLM_PLUGINS not naming them) answers 404:
`RoutesMissing`, and weight_push.py falls back to vLLM's own routes.
"""
import json
import time
import zlib

import numpy as np

from jaxrl_vl.rollout.client import VLLMClient, VLLMError

STAGE_ROUTE = "/jaxrl/weights/stage"
COMMIT_ROUTE = "/jaxrl/weights/commit"
SEND_PIECE_BYTES = 2**20  # slices handed to the HTTP stack: its copies stay small and reuse memory
_SAFETENSORS_CODES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16"}


class RoutesMissing(Exception):
    """The server has no /jaxrl/weights routes (404)."""


class PushRejected(Exception):
    """The server refused or failed the push; its message says whether it kept its weights."""


def safetensors_pieces(arrays: dict[str, np.ndarray]) -> list:
    """A safetensors file as [8-byte length + JSON header, each array's bytes (views, not copies)].
    `arrays`: C-contiguous float32/float16 arrays (weight_push._wire_arrays)."""
    header, offset = {}, 0
    for name, array in arrays.items():
        header[name] = {"dtype": _SAFETENSORS_CODES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    return [len(encoded).to_bytes(8, "little") + encoded,
            *(memoryview(array).cast("B") for array in arrays.values() if array.nbytes)]


def raise_for(error: VLLMError, what: str):
    if error.status_code == 404:
        raise RoutesMissing(what) from error
    raise PushRejected(f"{what}: {error}") from error


async def stage_chunk(client: VLLMClient, index: int, arrays: dict[str, np.ndarray], *,
                      checksum: bool = True) -> dict[str, float]:
    """Sends one chunk to staging slot `index`. Returns client-side seconds (checksum, send)."""
    start = time.perf_counter()
    pieces = safetensors_pieces(arrays)
    num_bytes = sum(len(p) if isinstance(p, bytes) else p.nbytes for p in pieces)
    params = {"index": index, "num_bytes": num_bytes}
    if checksum:  # catches corruption in transit (the engine checks structure and shapes either way)
        crc = 0
        for piece in pieces:
            crc = zlib.crc32(piece, crc)
        params["crc32"] = crc
    checksum_done = time.perf_counter()

    async def body():
        for piece in pieces:
            for begin in range(0, len(piece), SEND_PIECE_BYTES):
                yield piece[begin:begin + SEND_PIECE_BYTES]

    try:
        answer = await client.request("POST", STAGE_ROUTE, params=params, content=body, headers={
            "content-type": "application/octet-stream", "content-length": str(num_bytes)})
    except VLLMError as error:
        raise_for(error, f"staging chunk {index} ({num_bytes} bytes)")
    return {"checksum": checksum_done - start, "send": time.perf_counter() - checksum_done,
            "server_stage": answer["seconds"]}


async def commit(client: VLLMClient, version: str | int, *, pause_mode: str, num_chunks: int = 0,
                 manifest: dict | None = None, weights_path: str | None = None,
                 shm: dict | None = None) -> dict[str, float]:
    """pause -> load (staged chunks with `manifest`, the folder `weights_path`, or the shared-memory slot
    `shm` = {slot, nonce, layout_id}: weight_shm.py) -> version -> resume, server-side. Returns the
    server's seconds per phase."""
    body = {"version": str(version), "pause_mode": pause_mode, "num_chunks": num_chunks, "manifest": manifest,
            "weights_path": weights_path, "shm": shm}
    start = time.perf_counter()
    try:
        answer = await client.request("POST", COMMIT_ROUTE, json=body)
    except VLLMError as error:
        raise_for(error, f"commit of version {version}")
    return {"commit": time.perf_counter() - start,
            **{f"server_{phase}": seconds for phase, seconds in answer["seconds"].items()}}
