"""Worker side of the `shm` transport: the served model's parameters live in shared memory that the
trainer writes directly; a push is the trainer's one copy, a pointer swap and the CPU GEMM re-pack.

Why: vLLM's in-engine reload (model.load_weights through every weight loader, then each layer's
process_weights_after_loading) took 3-4x the time of writing the model once to /dev/shm, by itself.

Mixed into vLLM's worker with `--worker-extension-cls jaxrl_vl_vllm_plugin.shm_worker.ShmWeightsWorker`
(jaxrl_vl.rollout.server does when ServerConfig.shm_weights is set); routes.py calls it.

`jaxrl_shm_layout(tensors)` (first push; the engine is paused around it):
  1. Probe: every parameter is replaced for a moment by a float64 scratch tensor of its checkpoint
     format shape (vLLM's reload metadata; CPU linear layers dropped their unpacked weight), then
     the model's own `load_weights` runs on tensors whose values are their element indices. Each
     scratch tensor then says which checkpoint element lands where (renames, merged qkv / gate_up,
     padding): per checkpoint tensor, a few copy runs (parameter, element offset, source offset,
     count). The live parameters are put back untouched.
  2. Two slots (memfd), each a 64-byte header then every parameter, 64-byte aligned, filled with the
     served values where they exist (padding rows the checkpoint never covers).
`jaxrl_shm_commit(slot, nonce, layout_id)` (engine paused): the trainer wrote the slot NOT in use and
then the push's nonce into its header; a header without the nonce (a write that stopped half way, a
stale slot) or a parameter whose shape changed is refused before the model is touched. Then every
parameter is pointed at the slot (`param.data = view`: norms, embeddings, biases, convolutions read it
in place) and each CPU linear layer is re-packed from it with vLLM's own
`dispatch_cpu_unquantized_gemm`, as its process_weights_after_loading does: the oneDNN handler keeps a
private packed copy (an unpacked torch GEMM on the slot would skip that copy, but generated 2.6x slower
here), so what the engine computes is bit for bit what vLLM's own reload of the same weights gives.

A later push through vLLM's own reload (`reload`/`stream` transports) copies into the adopted
parameters and re-packs as usual; the next shm commit adopts a slot again.
CPU servers in eager mode only (parameters become host memory; a compiled graph may hold the old
oneDNN handlers).
"""
import functools
import hashlib
import mmap
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

HEADER_BYTES = 64
ALIGN_BYTES = 64
MAX_RUNS_PER_TENSOR = 64  # a transposing loader would scatter elements: not a layout for memcpy


class ShmLayoutError(ValueError):
    """The served model cannot adopt pushed tensors this way; the message says why."""


class _Entry:
    """One model parameter's place in a slot."""

    def __init__(self, layer, name, offset, dtype, shape):
        self.layer, self.name, self.offset, self.dtype, self.shape = layer, name, offset, dtype, tuple(shape)
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * torch.empty(0, dtype=dtype).element_size()


class _Layout:
    def __init__(self, entries, slot_bytes, layout_id, request, tensors):
        self.entries, self.slot_bytes, self.layout_id = entries, slot_bytes, layout_id
        self.request, self.tensors = request, tensors  # the trainer's manifest hash; the runs it gets
        self.fds = [os.memfd_create(f"jaxrl_vl_shm_slot_{i}") for i in range(2)]
        self.maps, self.slots = [], []
        for fd in self.fds:
            os.ftruncate(fd, slot_bytes)
            mapped = mmap.mmap(fd, slot_bytes)
            self.maps.append(mapped)
            self.slots.append(torch.frombuffer(mapped, dtype=torch.uint8))
        self.active: int | None = None
        for entry in entries:  # made once: a commit only assigns them
            entry.views = [s[entry.offset:entry.offset + entry.nbytes].view(entry.dtype).view(entry.shape)
                           for s in self.slots]


class ShmWeightsWorker:
    """Methods added to vLLM's worker (called by routes.py through collective_rpc)."""

    def jaxrl_shm_layout(self, tensors: dict) -> dict:
        """tensors: {checkpoint name: [numpy dtype name, shape]} the trainer will push. Idempotent: the
        same request gets the same slots back (with the slot in use), e.g. for a restarted trainer."""
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            raise ShmLayoutError("the shm transport is for CPU servers (the model's parameters become views of "
                                 "host shared memory); use transport 'reload' or 'stream' on GPUs")
        if not self.vllm_config.model_config.enforce_eager:
            raise ShmLayoutError("the shm transport needs an eager server (--enforce-eager; "
                                 "ServerConfig.enforce_eager=True): a compiled graph may keep the old weights")
        request = hashlib.sha256(repr(sorted((n, tuple(s)) for n, (_, s) in tensors.items())).encode()).hexdigest()
        layout = getattr(self, "_jaxrl_shm", None)
        if layout is None or layout.request != request:
            layout = self._jaxrl_shm = self._make_layout(tensors, request)
        pid = os.getpid()
        return {"layout_id": layout.layout_id, "slot_bytes": layout.slot_bytes, "header_bytes": HEADER_BYTES,
                "slot_paths": [f"/proc/{pid}/fd/{fd}" for fd in layout.fds], "active_slot": layout.active,
                "tensors": layout.tensors}

    def _make_layout(self, tensors: dict, request: str) -> "_Layout":
        model = self.model_runner.get_model()
        with torch.no_grad():
            params, runs = _probe(model, {n: tuple(s) for n, (_, s) in tensors.items()})
        entries, offset = [], HEADER_BYTES
        for layer, name, template in params:
            entry = _Entry(layer, name, offset, template.dtype, template.shape)
            entries.append(entry)
            offset += -(-entry.nbytes // ALIGN_BYTES) * ALIGN_BYTES
        described = {name: {"shape": list(tensors[name][1]),
                            "runs": [[entries[p].offset + o * _itemsize(entries[p].dtype), s, n,
                                      str(entries[p].dtype).removeprefix("torch.")] for p, o, s, n in r]}
                     for name, r in runs.items()}
        layout_id = hashlib.sha256((request + repr(described)).encode()).hexdigest()[:16]
        # A previous layout's slots stay mapped while the model still reads one of them (the views
        # hold the mapping); its descriptors are closed so nothing else can write there.
        old = getattr(self, "_jaxrl_shm", None)
        if old is not None:
            for fd in old.fds:
                os.close(fd)
        layout = _Layout(entries, offset, layout_id, request, described)
        with torch.no_grad():
            for slot in range(2):  # the served values, for elements no checkpoint tensor covers
                for entry in entries:
                    live = entry.layer._parameters[entry.name]
                    if tuple(live.shape) == entry.shape:
                        entry.views[slot].copy_(live)
        return layout

    def jaxrl_shm_commit(self, slot: int, nonce: int, layout_id: str) -> dict:
        start = time.perf_counter()
        layout = getattr(self, "_jaxrl_shm", None)
        if layout is None or layout.layout_id != layout_id:
            raise ShmLayoutError(f"shm layout {layout_id} unknown to this server (restarted?); ask for the layout "
                                 "again; model unchanged")
        if slot not in (0, 1) or slot == layout.active:
            raise ShmLayoutError(f"slot {slot} is not the free slot (active: {layout.active}); model unchanged")
        header = int.from_bytes(layout.maps[slot][:8], "little")
        if header != nonce:
            raise ShmLayoutError(f"slot {slot} header holds nonce {header}, the commit says {nonce}: the trainer's "
                                 "write did not finish; model unchanged")
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

        packed = []
        for entry in layout.entries:  # check everything before touching anything
            param = entry.layer._parameters[entry.name]
            emptied = param.numel() == 0 and entry.nbytes > 0  # vLLM dropped it once packed
            repack = (entry.name == "weight" and hasattr(entry.layer, "cpu_linear")
                      and not getattr(entry.layer, "_cpu_skip_gemm_dispatch", False))  # vLLM leaves those unpacked
            if repack:
                packed.append((entry.layer, emptied))
            if tuple(param.shape) != entry.shape and not (repack and emptied):
                raise ShmLayoutError(f"{type(entry.layer).__name__}.{entry.name} has shape {tuple(param.shape)}, "
                                     f"the layout {entry.shape}; model unchanged")
        for entry in layout.entries:
            entry.layer._parameters[entry.name].data = entry.views[slot]
        swapped = time.perf_counter()
        # Every parameter reads the slot now (biases included: packing may convert them); re-pack the
        # linear layers from it exactly as vLLM's process_weights_after_loading does on CPU.
        # Threads: most of a small layer's re-pack is oneDNN's single-threaded handler set-up (~0.15 ms
        # even for 128x128), which runs without the GIL. Each handler depends only on its own weight.
        list(_repack_pool().map(lambda item: dispatch_cpu_unquantized_gemm(item[0], remove_weight=item[1]), packed))
        packed_done = time.perf_counter()
        layout.active = slot
        layout.maps[slot][:8] = bytes(8)  # consumed: the same nonce cannot commit this slot twice
        # (the caller drops the prefix and encoder caches: routes.py, engine_core.py)
        return {"active_slot": slot, "seconds": time.perf_counter() - start, "swap_seconds": swapped - start,
                "pack_seconds": packed_done - swapped, "num_packed": len(packed)}


@functools.cache
def _repack_pool() -> ThreadPoolExecutor:
    """Re-pack threads allowed on the cores of the whole server, not just the worker's: vLLM's CPU worker
    pins itself to its OMP cores (on 2 cores: core 0 alone), while the engine is paused for the commit
    the API server's cores are idle. The small model's ~40 layers on 2 cores: 12.9 ms in one thread, ~9 in two."""
    cores = os.sched_getaffinity(0) | os.sched_getaffinity(os.getppid())
    return ThreadPoolExecutor(min(len(cores), 8), thread_name_prefix="jaxrl_shm_repack",
                              initializer=os.sched_setaffinity, initargs=(0, cores))  # 0: the calling thread


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def _probe(model: torch.nn.Module, shapes: dict[str, tuple[int, ...]]):
    """Runs model.load_weights on index-valued float64 tensors into scratch parameters. Returns
    ([(layer, name, template)] of every parameter, {checkpoint name: [(param index, elem offset,
    source offset, count)]})."""
    from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO
    from vllm.model_executor.model_loader.reload.sanitize import restore_layer_refs

    params, saved, scratch_of = [], [], {}
    for layer in model.modules():
        info = LAYERWISE_INFO.get(layer)
        restore = info.restore_metadata[0] if info is not None else {}
        for name, live in list(layer._parameters.items()):
            if live is None:
                continue
            saved.append((layer, name, live))
            if id(live) in scratch_of:  # shared (tied) parameter: one scratch tensor
                layer._parameters[name] = scratch_of[id(live)]
                continue
            template = restore.get(name, live)
            if live.numel() == 0 and name not in restore:
                raise ShmLayoutError(f"{type(layer).__name__}.{name} was emptied by weight processing and vLLM kept "
                                     "no reload metadata for it")
            scratch = torch.full(tuple(template.shape), -1.0, dtype=torch.float64)
            scratch.__class__ = template.__class__
            scratch.__dict__ = template.__dict__.copy()
            for key in ("weight_loader", "_weight_loader"):  # plain Parameter / vLLM's BasevLLMParameter
                loader = scratch.__dict__.get(key)
                while getattr(loader, "__name__", "") == "online_process_loader":
                    # a past vLLM reload left its deferring wrapper on the metadata: call what it wraps
                    loader = scratch.__dict__[key] = loader.__wrapped__
            scratch = restore_layer_refs(scratch, layer)
            scratch_of[id(live)] = scratch
            layer._parameters[name] = scratch
            params.append((layer, name, template, scratch))
    names = list(shapes)
    bases, base = [], 0
    for name in names:
        bases.append(base)
        base += int(np.prod(shapes[name], dtype=np.int64)) + 1  # a gap: no run crosses two tensors
    try:
        model.load_weights((name, torch.arange(b, b + int(np.prod(shapes[name], dtype=np.int64)),
                                               dtype=torch.float64).reshape(shapes[name]))
                           for name, b in zip(names, bases))
        runs = {name: [] for name in names}
        covered = np.zeros(base, dtype=bool)
        for index, (layer, name, _, scratch) in enumerate(params):
            for offset, source, count in _runs(scratch.detach().reshape(-1).numpy(), f"{type(layer).__name__}.{name}"):
                k = int(np.searchsorted(bases, source, side="right")) - 1
                runs[names[k]].append((index, offset, source - bases[k], count))
                covered[source:source + count] = True
    finally:
        for layer, name, live in saved:
            layer._parameters[name] = live
    missing = [n for n, b in zip(names, bases) if not covered[b:b + int(np.prod(shapes[n], dtype=np.int64))].all()]
    if missing:
        raise ShmLayoutError(f"the served model does not load (all of) {len(missing)} pushed tensors, e.g. "
                             f"{missing[:5]}: the shm transport would drop them")
    fragmented = [n for n, r in runs.items() if len(r) > MAX_RUNS_PER_TENSOR]
    if fragmented:
        raise ShmLayoutError(f"the model's loaders scatter {fragmented[:5]} (transposed or strided): not a layout "
                             "the shm transport copies; use transport 'reload'")
    return [(layer, name, template) for layer, name, template, _ in params], runs


def _runs(values: np.ndarray, where: str):
    """(element offset, source index, count) of each stretch of consecutive source indices."""
    valid = values >= 0
    index = values.astype(np.int64)
    if not np.array_equal(index[valid], values[valid]):
        raise ShmLayoutError(f"{where}: its weight loader transforms values (not a copy); use transport 'reload'")
    continues = np.zeros(len(values), dtype=bool)
    continues[1:] = valid[1:] & valid[:-1] & (index[1:] == index[:-1] + 1)
    starts = np.flatnonzero(valid & ~continues)
    boundaries = np.append(np.flatnonzero(~continues), len(values))
    ends = boundaries[np.searchsorted(boundaries, starts, side="right")]
    return [(int(s), int(index[s]), int(e - s)) for s, e in zip(starts, ends)]
