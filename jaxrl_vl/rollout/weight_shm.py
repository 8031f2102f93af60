"""The `shm` weight push, trainer side: write the new tensors once, straight into the memory the
vLLM server's model reads (same host; server side: plugins/vllm_weight_stream/.../shm_worker.py).

First push to a server: POST /jaxrl/weights/shm/layout {"tensors": {name: [dtype, shape]}} answers the
server's two slot files (/proc/<worker pid>/fd/N: anonymous shared memory, freed with the server) and,
per tensor, its copy runs [byte offset in a slot, source element offset, count, dtype] in vLLM's own
parameter layout (merged qkv / gate_up, padding): the server works them out from its model's weight
loaders. Both slots are mapped here once (`_SLOTS`, per server URL).
Every push: a state that does not match the layout (names, shapes) is refused before anything is
written; each run is one np.copyto into the slot the server is NOT using (a memcpy for fp32, a cast
for a bf16 server); the slot's header gets a fresh nonce last; then POST /jaxrl/weights/commit
{"shm": {slot, nonce, layout_id}}: the server pauses, checks the nonce (a write that stopped half way
is refused, the old weights and version stay), points its parameters at the slot, sets the version,
resumes. The old slot is the next push's target (double buffering: the engine never reads memory the
trainer is writing). One trainer per server: two trainers pushing to one server would write the same
free slot.
"""
import dataclasses
import mmap
import os
import time

import numpy as np

from jaxrl_vl.rollout import weight_routes
from jaxrl_vl.rollout.client import VLLMClient, VLLMError

LAYOUT_ROUTE = "/jaxrl/weights/shm/layout"


@dataclasses.dataclass
class _ServerSlots:
    layout_id: str
    shapes: dict  # {name: shape tuple} the layout was made for
    maps: list  # the two slots, mapped
    copies: dict  # {name: [(per-slot destination arrays, source element offset, count)]}
    active: int | None  # the slot the server's model reads (None: still its own loaded weights)
    paths: list  # the slot files (/proc/<worker pid>/fd/N): gone once that server exits


_SLOTS: dict[str, _ServerSlots] = {}


def _numpy_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


async def _slots_for(client: VLLMClient, state: dict) -> _ServerSlots:
    slots = _SLOTS.get(client.base_url)
    if slots is not None:
        if len(state) == len(slots.shapes) and all(np.shape(a) == slots.shapes.get(n) for n, a in state.items()):
            return slots
        shapes = {n: np.shape(a) for n, a in state.items()}
        missing, extra = sorted(set(slots.shapes) - set(shapes)), sorted(set(shapes) - set(slots.shapes))
        wrong = [f"{n}: {shapes[n]} != {slots.shapes[n]}" for n in sorted(set(shapes) & set(slots.shapes))
                 if shapes[n] != slots.shapes[n]]
        raise weight_routes.PushRejected(f"{client.base_url}: shm push refused before writing (tensors missing "
                                         f"{missing[:5]}, unexpected {extra[:5]}, shapes differ {wrong[:5]}); the "
                                         "server keeps its weights and version")
    for url in [u for u, s in _SLOTS.items() if not os.path.exists(s.paths[0])]:
        del _SLOTS[url]  # a server that exited (e.g. restarted on another port): unmap its memory
    manifest = {name: [str(np.asarray(a).dtype), list(np.shape(a))] for name, a in sorted(state.items())}
    try:
        answer = await client.request("POST", LAYOUT_ROUTE, json={"tensors": manifest})
    except VLLMError as error:
        weight_routes.raise_for(error, "shm layout")
    maps = []
    for path in answer["slot_paths"]:
        try:
            with open(path, "r+b") as handle:
                maps.append(mmap.mmap(handle.fileno(), answer["slot_bytes"]))
        except OSError as error:
            raise weight_routes.PushRejected(f"shm: cannot map the server's slot {path} ({error}); the shm transport "
                                             "needs the server on this host") from error
    copies = {name: [([np.frombuffer(m, dtype=_numpy_dtype(dtype), count=count, offset=offset) for m in maps],
                      source, count) for offset, source, count, dtype in described["runs"]]
              for name, described in answer["tensors"].items()}
    slots = _ServerSlots(answer["layout_id"], {n: tuple(s) for n, (_, s) in manifest.items()}, maps, copies,
                         answer["active_slot"], answer["slot_paths"])
    _SLOTS[client.base_url] = slots
    return slots


def _write_slot(slots: _ServerSlots, state: dict, slot: int) -> int:
    """Copies `state` into `slot`; returns the nonce written into its header after the data."""
    header = slots.maps[slot]
    header[:8] = bytes(8)  # no valid nonce until every tensor is in
    for name, array in state.items():
        flat = np.asarray(array).reshape(-1)
        for destinations, source, count in slots.copies[name]:
            np.copyto(destinations[slot], flat[source:source + count], casting="unsafe")
    nonce = int.from_bytes(os.urandom(8), "little") | 1
    header[:8] = nonce.to_bytes(8, "little")
    return nonce


async def push(client: VLLMClient, state: dict, version: str | int, *, pause_mode: str) -> dict[str, float]:
    """One server. Returns seconds per phase: layout (first push only), write, commit, server_*."""
    start = time.perf_counter()
    slots = await _slots_for(client, state)
    layout_done = time.perf_counter()
    slot = 0 if slots.active is None else 1 - slots.active
    nonce = _write_slot(slots, state, slot)
    write_done = time.perf_counter()
    try:
        phases = await weight_routes.commit(client, version, pause_mode=pause_mode,
                                            shm={"slot": slot, "nonce": nonce, "layout_id": slots.layout_id})
    except weight_routes.PushRejected:
        _SLOTS.pop(client.base_url, None)  # the next push asks the server again (it may have restarted)
        raise
    slots.active = slot
    return {"layout": layout_done - start, "write": write_done - layout_done, **phases}
