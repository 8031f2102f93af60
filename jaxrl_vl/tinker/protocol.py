"""Wire formats of the Tinker API (SDK `tinker==0.38.0`): protobuf parsing/encoding and JSON chunks.

`forward_backward` requests arrive as protobuf (`tinker.proto.tinker_public_pb2.ForwardBackwardRequest`,
optionally zstd-compressed); `ForwardBackwardOutput` and `SampleResponse` results go back as protobuf.
Everything else is JSON. Parsed inputs use plain dataclasses / numpy so the backend never sees protobuf.

A model input is a list of chunks:
  TextChunk(tokens int32 [n])
  ImageChunk(data bytes (encoded png/jpeg), format str, expected_tokens int | None)
"""
from __future__ import annotations

import base64
import dataclasses
import math

import numpy as np
from tinker.proto import tinker_public_pb2 as pb

SUPPORTED_LOSSES = ("cross_entropy", "importance_sampling", "ppo", "cispo", "dro")


class UserError(ValueError):
    """The request is wrong (category "user" on the wire); the message says which field and how to fix it."""


class NotFoundError(UserError):
    """A named thing (checkpoint, sampling session, model) does not exist here (HTTP 404 at submit)."""


@dataclasses.dataclass(frozen=True)
class TextChunk:
    tokens: np.ndarray  # int32 [n]


@dataclasses.dataclass(frozen=True)
class ImageChunk:
    data: bytes
    format: str
    expected_tokens: int | None


Chunk = TextChunk | ImageChunk


@dataclasses.dataclass
class Datum:
    chunks: list[Chunk]
    loss_fn_inputs: dict[str, np.ndarray]  # name -> dense array (float32 or int64), leading dim = input length


@dataclasses.dataclass
class ForwardBackwardCall:
    model_id: str
    seq_id: int | None
    loss_fn: str
    loss_fn_config: dict[str, float]
    forward_only: bool
    data: list[Datum]


def _tensor_to_numpy(msg: pb.Tensor, name: str) -> np.ndarray:
    dtypes = {pb.DTYPE_FLOAT32: np.float32, pb.DTYPE_INT64: np.int64, pb.DTYPE_INT32: np.int32}
    if msg.dtype not in dtypes:
        raise UserError(f"loss_fn_inputs[{name!r}]: unsupported dtype enum {msg.dtype}; send float32 or int64")
    dtype = dtypes[msg.dtype]
    shape = tuple(int(s) for s in msg.shape)
    if msg.HasField("sparse_csr"):
        # CSR rows over the leading dim; densify (only the `decisions` recipe sends these).
        values = np.frombuffer(msg.sparse_csr.values, dtype)
        crow = np.frombuffer(msg.sparse_csr.crow_indices, np.int64)
        col = np.frombuffer(msg.sparse_csr.col_indices, np.int64)
        if len(shape) != 2:
            raise UserError(f"loss_fn_inputs[{name!r}]: sparse CSR tensors need a 2-D shape, got {shape}")
        dense = np.zeros(shape, dtype)
        for row in range(shape[0]):
            dense[row, col[crow[row]:crow[row + 1]]] = values[crow[row]:crow[row + 1]]
        return dense
    array = np.frombuffer(msg.dense, dtype).copy()
    if shape and math.prod(shape) != array.size:
        raise UserError(f"loss_fn_inputs[{name!r}]: shape {list(shape)} does not match {array.size} elements")
    return array.reshape(shape) if shape else array


def _chunk_from_proto(msg: pb.Chunk, where: str) -> Chunk:
    kind = msg.WhichOneof("chunk")
    if kind == "encoded_text":
        return TextChunk(np.frombuffer(msg.encoded_text.tokens, np.int32).copy())
    if kind == "image":
        expected = msg.image.expected_tokens if msg.image.HasField("expected_tokens") else None
        return ImageChunk(bytes(msg.image.data), msg.image.format or "png", expected)
    raise UserError(f"{where}: chunk type {kind!r} is not supported; send encoded_text or image chunks")


def parse_forward_backward(body: bytes, content_encoding: str | None = None) -> ForwardBackwardCall:
    """Protobuf body -> ForwardBackwardCall. Raises UserError for undecodable bodies."""
    if content_encoding and "zstd" in content_encoding:
        import zstandard
        try:
            body = zstandard.ZstdDecompressor().decompress(body, max_output_size=1 << 31)
        except zstandard.ZstdError as error:
            raise UserError(f"forward_backward body: zstd decompression failed ({error})") from error
    msg = pb.ForwardBackwardRequest()
    try:
        msg.ParseFromString(body)
    except Exception as error:  # protobuf raises DecodeError (a plain Exception subclass)
        raise UserError(f"forward_backward body is not a valid tinker ForwardBackwardRequest protobuf "
                        f"({type(error).__name__}: {error}); send Content-Type application/x-protobuf "
                        "as tinker==0.38.0 does") from error
    if not msg.model_id:
        raise UserError("forward_backward: model_id is empty")
    config = {k: float(v) for k, v in msg.loss_fn_config.items()}
    for key, value in msg.loss_fn_config_v2.items():
        if value.WhichOneof("value") == "text":
            raise UserError(f"loss_fn_config[{key!r}]: text values are not supported by this server")
        config[key] = float(value.number)
    data = []
    for i, datum in enumerate(msg.data):
        chunks = [_chunk_from_proto(c, f"data[{i}].model_input[{j}]") for j, c in enumerate(datum.model_input)]
        inputs = {name: _tensor_to_numpy(t, name) for name, t in datum.loss_fn_inputs.items()}
        data.append(Datum(chunks, inputs))
    return ForwardBackwardCall(model_id=msg.model_id, seq_id=int(msg.seq_id) or None, loss_fn=msg.loss_fn,
                               loss_fn_config=config, forward_only=bool(msg.forward_only), data=data)


def chunks_from_json(prompt: dict, where: str = "prompt") -> list[Chunk]:
    """A JSON ModelInput {"chunks": [...]} (sample requests) -> chunks. Image data is base64."""
    if not isinstance(prompt, dict) or not isinstance(prompt.get("chunks"), list):
        raise UserError(f"{where}: expected a ModelInput object {{'chunks': [...]}}")
    chunks: list[Chunk] = []
    for j, chunk in enumerate(prompt["chunks"]):
        kind = chunk.get("type", "encoded_text")
        if kind == "encoded_text":
            chunks.append(TextChunk(np.asarray(chunk.get("tokens", []), np.int32)))
        elif kind == "image":
            try:
                data = base64.b64decode(chunk["data"], validate=False)
            except Exception as error:
                raise UserError(f"{where}.chunks[{j}].data: not base64 ({error})") from error
            chunks.append(ImageChunk(data, chunk.get("format", "png"), chunk.get("expected_tokens")))
        else:
            raise UserError(f"{where}.chunks[{j}]: chunk type {kind!r} is not supported; send encoded_text "
                            "or image chunks (image_asset_pointer needs a server-side asset store)")
    return chunks


def _batched(arrays: list[np.ndarray], dtype, proto_dtype) -> pb.BatchedTensor:
    arrays = [np.ascontiguousarray(a, dtype) for a in arrays]
    sizes = [a.nbytes for a in arrays]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    data = b"".join(a.tobytes() for a in arrays)
    return pb.BatchedTensor(data=data, offsets=offsets.tobytes(), dtype=proto_dtype, trailing_shape=[])


def encode_forward_backward_output(per_datum: list[dict[str, np.ndarray]], metrics: dict[str, float]) -> bytes:
    """per_datum[i] = {"logprobs": float32 [N_i], "elementwise_loss": float32 [N_i]} -> protobuf bytes."""
    record = pb.ArrayRecord(type_tag="ArrayRecord", num_datums=len(per_datum))
    names = sorted(per_datum[0]) if per_datum else []
    for name in names:
        record.fields[name].CopyFrom(_batched([d[name] for d in per_datum], np.float32, pb.DTYPE_FLOAT32))
    out = pb.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord")
    out.loss_fn_outputs.append(record)
    for key, value in metrics.items():
        out.metrics[key] = float(value)
    return out.SerializeToString()


def encode_sample_response(sequences: list[dict], prompt_logprobs: np.ndarray | None) -> bytes:
    """sequences[i] = {"tokens": int[], "logprobs": float[], "stop_reason": "stop"|"length"} -> protobuf."""
    out = pb.SampleResponse()
    for seq in sequences:
        item = out.sequences.add()
        item.stop_reason = pb.STOP_REASON_STOP if seq["stop_reason"] == "stop" else pb.STOP_REASON_LENGTH
        item.tokens = np.asarray(seq["tokens"], np.int32).tobytes()
        if seq.get("logprobs") is not None:
            item.logprobs = np.asarray(seq["logprobs"], np.float32).tobytes()
    if prompt_logprobs is not None:
        out.prompt_logprobs = np.asarray(prompt_logprobs, np.float32).tobytes()
    return out.SerializeToString()


def input_length(chunks: list[Chunk]) -> int | None:
    """Tokens the client counts (images by expected_tokens); None when an image has no expected_tokens."""
    total = 0
    for chunk in chunks:
        if isinstance(chunk, TextChunk):
            total += len(chunk.tokens)
        elif chunk.expected_tokens is None:
            return None
        else:
            total += int(chunk.expected_tokens)
    return total
