"""Worker side of the `jaxrl_stream` transport: weights arrive inline in /update_weights requests.

The trainer (jaxrl_vl.rollout.weight_push, transport "stream") sends the HF-named tensors in
chunks of bounded size, each chunk a safetensors blob in base64 inside the JSON body of
POST /update_weights, between POST /start_weight_update and POST /finish_weight_update. Nothing
touches a shared disk, so the trainer may run on another host (e.g. a Cloud TPU VM feeding a GPU
vLLM server). Checkpoint-format names go through the model's own `load_weights` (fused q/k/v and
gate/up handled by vLLM) under layerwise reload, as vLLM's IPC backend does. The plugin's own
routes (routes.py) instead stage each chunk raw into a shared-memory file on this host and pass
its path (`staged_path`): same checks and commit, no base64, no copy through the engine's RPCs.

Staging. vLLM's layerwise reload moves the model's parameters to the meta device first, so a push
that fails half way would leave the server without usable weights. Chunks are therefore only
staged (host memory, about one model's size) and checked as they arrive: crc32 and byte count of
the blob, a well-formed safetensors file, every tensor a name and shape of the served checkpoint,
no duplicates. The last /update_weights message is a commit carrying the trainer's manifest (chunk
count, names, dtypes, shapes, bytes); only when everything declared arrived intact and the
checkpoint's tensors are all present does the swap into the model run. Any failure raises from
/update_weights (vLLM's worker then ends the update session), the staged tensors are dropped and the
model and its weight_version stay as they were. A message {"abort": true} drops a session left open
by a trainer that died mid-stream.
"""
import base64
import binascii
import dataclasses
import glob
import os
import zlib

import safetensors
import safetensors.torch
from vllm.distributed.weight_transfer.base import WeightTransferEngine
from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload


class WeightStreamRejected(ValueError):
    """A push that is incomplete or does not fit the served model; the model is untouched."""


@dataclasses.dataclass
class StreamInitInfo:
    protocol_version: int = 1


@dataclasses.dataclass
class StreamUpdateInfo:
    safetensors_b64: str = ""  # one chunk: a safetensors file's bytes, base64
    # or: the chunk as a safetensors file on this host, staged raw by POST /jaxrl/weights/stage
    # (routes.py), which checked num_bytes and crc32 as the bytes arrived
    staged_path: str = ""
    chunk_index: int = 0
    crc32: int | None = None  # zlib.crc32 of the decoded chunk bytes
    num_bytes: int | None = None  # length of the decoded chunk bytes
    # the last message: {"num_chunks": int, "num_bytes": int (tensor data), "tensors": {name: [dtype, shape]}}
    commit: dict | None = None
    abort: bool = False


class StreamWeightTransferEngine(WeightTransferEngine[StreamInitInfo, StreamUpdateInfo]):
    init_info_cls = StreamInitInfo
    update_info_cls = StreamUpdateInfo
    supports_draft_weight_update = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # The served checkpoint, noted now: a later `reload_weights(weights_path=...)` repoints
        # model_config.model at the pushed folder, which is gone after the push.
        self._checkpoint_dir = str(self.model_config.model)
        self._expected: dict[str, tuple[int, ...]] | None = None
        self._reset()

    def init_transfer_engine(self, init_info: StreamInitInfo) -> None:
        if init_info.protocol_version != 1:
            raise ValueError(f"jaxrl_stream: protocol_version {init_info.protocol_version} unsupported (expected 1)")

    def _reset(self) -> None:
        self._staged, self._chunks, self._committed = {}, set(), False

    def start_weight_update(self) -> None:
        self._reset()

    def receive_weights(self, update_info: StreamUpdateInfo) -> None:
        try:
            if update_info.abort:
                raise WeightStreamRejected("jaxrl_stream: update aborted by the trainer; staged tensors dropped, "
                                           "model unchanged")
            if update_info.commit is not None:
                self._commit(update_info.commit)
            else:
                self._stage(update_info)
        except BaseException:
            self._reset()  # vLLM ends the session on any error here: start the next one clean
            raise

    def finish_weight_update(self) -> None:
        if not self._committed:
            raise WeightStreamRejected("jaxrl_stream: finish_weight_update without a validated commit message; "
                                       "model and weight_version unchanged")
        self._reset()

    def shutdown(self) -> None:
        self._reset()

    # ---- staging and validation -------------------------------------------------------------------
    def _stage(self, info: StreamUpdateInfo) -> None:
        where = f"jaxrl_stream chunk {info.chunk_index}"
        if info.chunk_index in self._chunks:
            raise WeightStreamRejected(f"{where}: received twice")
        tensors = self._read_staged(info, where) if info.staged_path else self._decode_inline(info, where)
        expected = self._expected_shapes()
        for name, tensor in tensors.items():
            if name in self._staged:
                raise WeightStreamRejected(f"{where}: tensor {name} sent twice")
            if expected is not None:
                key = self._model_key(name)
                if key not in expected:
                    raise WeightStreamRejected(f"{where}: tensor {name} is not a weight of the served model")
                if tuple(tensor.shape) != expected[key]:
                    raise WeightStreamRejected(f"{where}: tensor {name} has shape {tuple(tensor.shape)}, the served "
                                               f"model has {expected[key]}")
        self._staged.update(tensors)
        self._chunks.add(info.chunk_index)

    def _decode_inline(self, info: StreamUpdateInfo, where: str) -> dict:
        try:
            data = base64.b64decode(info.safetensors_b64, validate=True)
        except binascii.Error as error:
            raise WeightStreamRejected(f"{where}: not valid base64 ({error})") from error
        if info.num_bytes is not None and len(data) != info.num_bytes:
            raise WeightStreamRejected(f"{where}: {len(data)} bytes arrived, {info.num_bytes} were sent (truncated)")
        if info.crc32 is not None and zlib.crc32(data) != info.crc32:
            raise WeightStreamRejected(f"{where}: crc32 mismatch (corrupted in transit)")
        try:
            return safetensors.torch.load(data)
        except Exception as error:  # noqa: BLE001 - any parse failure is a corrupt chunk
            raise WeightStreamRejected(f"{where}: not a complete safetensors blob ({error})") from error

    def _read_staged(self, info: StreamUpdateInfo, where: str) -> dict:
        """Memory-maps the staged file (no copy: the model's loaders read it directly)."""
        size = os.stat(info.staged_path).st_size
        if info.num_bytes is not None and size != info.num_bytes:
            raise WeightStreamRejected(f"{where}: staged file has {size} bytes, {info.num_bytes} were sent")
        try:
            return safetensors.torch.load_file(info.staged_path)
        except Exception as error:  # noqa: BLE001 - any parse failure is a corrupt chunk
            raise WeightStreamRejected(f"{where}: not a complete safetensors file ({error})") from error

    def _commit(self, manifest: dict) -> None:
        num_chunks, declared = int(manifest["num_chunks"]), manifest["tensors"]
        missing_chunks = sorted(set(range(num_chunks)) - self._chunks)
        if missing_chunks or len(self._chunks) != num_chunks:
            raise WeightStreamRejected(f"jaxrl_stream: incomplete push: {len(self._chunks)} of {num_chunks} chunks "
                                       f"arrived (missing {missing_chunks[:10]}); model unchanged")
        missing = sorted(set(declared) - set(self._staged))
        extra = sorted(set(self._staged) - set(declared))
        if missing or extra:
            raise WeightStreamRejected(f"jaxrl_stream: tensors missing {missing[:10]} / not declared {extra[:10]}; "
                                       "model unchanged")
        for name, (dtype, shape) in declared.items():
            tensor = self._staged[name]
            if str(tensor.dtype).removeprefix("torch.") != dtype or list(tensor.shape) != list(shape):
                raise WeightStreamRejected(f"jaxrl_stream: {name} arrived as {tensor.dtype}{list(tensor.shape)}, "
                                           f"declared {dtype}{list(shape)}; model unchanged")
        num_bytes = sum(t.numel() * t.element_size() for t in self._staged.values())
        if num_bytes != int(manifest["num_bytes"]):
            raise WeightStreamRejected(f"jaxrl_stream: {num_bytes} tensor bytes arrived, {manifest['num_bytes']} "
                                       "declared; model unchanged")
        expected = self._expected_shapes()
        if expected is not None:
            absent = sorted(set(expected) - {self._model_key(n) for n in self._staged})
            if absent:
                raise WeightStreamRejected(f"jaxrl_stream: the push lacks {len(absent)} weights of the served model "
                                           f"(e.g. {absent[:5]}); model unchanged")
        # Everything checked: only now touch the model.
        initialize_layerwise_reload(self.model)
        self.model.load_weights(iter(self._staged.items()))
        finalize_layerwise_reload(self.model, self.model_config)
        self._staged, self._committed = {}, True

    def _model_key(self, name: str) -> str:
        """The served model's name for a checkpoint name (legacy and current HF names agree here)."""
        mapper = getattr(self.model, "hf_to_vllm_mapper", None)
        if mapper is None:
            return name
        mapped = mapper._map_name_with_shard(name)
        return name if mapped is None else f"{mapped[0]}#{mapped[1]}"

    def _expected_shapes(self) -> dict[str, tuple[int, ...]] | None:
        """{model key: shape} of the served checkpoint's tensors (read from the safetensors headers
        once), or None when the model is not a local folder."""
        if self._expected is None:
            folder = self._checkpoint_dir
            files = sorted(glob.glob(os.path.join(folder, "*.safetensors"))) if os.path.isdir(folder) else []
            if not files:
                return None
            expected = {}
            for path in files:
                with safetensors.safe_open(path, framework="pt") as handle:
                    for name in handle.keys():
                        expected[self._model_key(name)] = tuple(handle.get_slice(name).get_shape())
            self._expected = expected
        return self._expected
