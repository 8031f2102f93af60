"""Worker side of the `jaxrl_stream` transport: weights arrive inline in /update_weights requests.

The trainer (jaxrl_vl.rollout.weight_push, transport "stream") sends the HF-named tensors in
chunks of bounded size, each chunk a safetensors blob in base64 inside the JSON body of
POST /update_weights, between POST /start_weight_update and POST /finish_weight_update. Nothing
touches a shared disk, so the trainer may run on another host (e.g. a Cloud TPU VM feeding a GPU
vLLM server). Checkpoint-format names go through the model's own `load_weights` (fused q/k/v and
gate/up handled by vLLM) under layerwise reload, as vLLM's IPC backend does.
"""
import base64
import dataclasses

import safetensors.torch
from vllm.distributed.weight_transfer.base import WeightTransferEngine
from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload


@dataclasses.dataclass
class StreamInitInfo:
    protocol_version: int = 1


@dataclasses.dataclass
class StreamUpdateInfo:
    safetensors_b64: str  # one chunk: a safetensors file's bytes, base64
    chunk_index: int = 0


class StreamWeightTransferEngine(WeightTransferEngine[StreamInitInfo, StreamUpdateInfo]):
    init_info_cls = StreamInitInfo
    update_info_cls = StreamUpdateInfo
    supports_draft_weight_update = False

    def init_transfer_engine(self, init_info: StreamInitInfo) -> None:
        if init_info.protocol_version != 1:
            raise ValueError(f"jaxrl_stream: protocol_version {init_info.protocol_version} unsupported (expected 1)")

    def start_weight_update(self) -> None:
        initialize_layerwise_reload(self.model)

    def finish_weight_update(self) -> None:
        finalize_layerwise_reload(self.model, self.model_config)

    def receive_weights(self, update_info: StreamUpdateInfo) -> None:
        tensors = safetensors.torch.load(base64.b64decode(update_info.safetensors_b64))
        self.model.load_weights(iter(tensors.items()))

    def shutdown(self) -> None:
        pass
