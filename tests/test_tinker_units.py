"""Units of the Tinker server that need no model: futures ordering/dedup, storage paths, protobuf codecs."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

pytest.importorskip("tinker")
from tinker import types  # noqa: E402
from tinker.proto.request_conv import forward_backward_request_to_proto  # noqa: E402
from tinker.proto.response_conv import deserialize_forward_backward_output, deserialize_sample_response  # noqa: E402

from jaxrl_vl.tinker.futures import Failure, FutureStore  # noqa: E402
from jaxrl_vl.tinker.protocol import (ImageChunk, TextChunk, UserError, encode_forward_backward_output,  # noqa: E402
                                      encode_sample_response, parse_forward_backward)
from jaxrl_vl.tinker.sampling import vllm_sampling_params  # noqa: E402
from jaxrl_vl.tinker.storage import CheckpointStore, parse_tinker_path  # noqa: E402


def test_futures_run_in_seq_order_and_dedupe_retries():
    async def main():
        store = FutureStore(poll_seconds=0.2, gap_seconds=0.5)
        ran: list[int] = []

        def work(seq):
            async def run():
                await asyncio.sleep(0.01 * (5 - seq))  # later seq ids would finish first if unordered
                ran.append(seq)
                return {"seq": seq}
            return run
        ids = {seq: store.submit(work(seq), key="m", seq_id=seq, ordered=True) for seq in (3, 1, 4, 2)}
        assert store.submit(work(2), key="m", seq_id=2, ordered=True) == ids[2]  # retry: same future
        results = [await store.wait(ids[s], 5.0) for s in (1, 2, 3, 4)]
        assert ran == [1, 2, 3, 4] and [r["seq"] for r in results] == [1, 2, 3, 4]
        assert await store.wait(ids[1], 0.1) == {"seq": 1}  # kept for late polls

        # a gap (seq 6 never arrives) delays seq 7 by gap_seconds, then it runs
        gap_id = store.submit(work(2), key="m", seq_id=7, ordered=True)
        assert await store.wait(gap_id, 0.1) is None  # still waiting: the route answers try_again
        assert await store.wait(gap_id, 3.0) == {"seq": 2}

        async def boom():
            raise UserError("bad field x")
        failed = await store.wait(store.submit(boom), 1.0)
        assert isinstance(failed, Failure) and failed.category == "user" and "bad field x" in failed.message

        async def crash():
            raise RuntimeError("disk full")
        crashed = await store.wait(store.submit(crash), 1.0)
        assert crashed.category == "server" and "disk full" in crashed.message
    asyncio.run(main())


def test_tinker_paths_reject_escapes(tmp_path):
    cp = parse_tinker_path("tinker://sess-1:train:0/weights/step-000010")
    assert (cp.model_id, cp.kind, cp.name) == ("sess-1:train:0", "weights", "step-000010")
    for bad in ("tinker://a/weights/..", "tinker://../weights/x", "tinker://a/weights/x/y", "tinker://a/other/x",
                "file:///etc/passwd", "tinker://a/weights/", "tinker://a/weights/x y"):
        with pytest.raises(UserError):
            parse_tinker_path(bad)
    store = CheckpointStore(str(tmp_path))
    path = store.save_state(cp, {"lora": {"a": np.ones(2)}}, {"step": 3})
    trees, info = store.load_state(parse_tinker_path(path))
    assert info["step"] == 3 and trees["lora"]["a"].tolist() == [1.0, 1.0]
    with pytest.raises(UserError, match="does not exist"):
        store.load_state(parse_tinker_path("tinker://sess-1:train:0/weights/other"))
    assert [m["tinker_path"] for m in store.list("sess-1:train:0")] == [path]
    store.delete(cp)
    assert store.list("sess-1:train:0") == []


class _RunsCodeWhenUnpickled:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")  # unpickling creates the marker file


def test_state_storage_never_unpickles(tmp_path):
    """A pickle payload in the state file (or a legacy state.pkl) is refused with a UserError and
    its code never runs; the same bytes given to pickle.loads would run it."""
    import os
    import pickle

    from jaxrl_vl.tinker import storage

    store = CheckpointStore(str(tmp_path / "store"))
    marker = tmp_path / "code_ran"
    payload = pickle.dumps({"trees": _RunsCodeWhenUnpickled(str(marker)), "info_json": "{}"})
    for file_name, message in ((storage.STATE_FILE, "corrupt or not a saved training state"),
                               (storage.LEGACY_PICKLE_FILE, "old pickle format")):
        cp = parse_tinker_path(f"tinker://m/weights/{file_name.replace('.', '_')}")
        os.makedirs(store.folder(cp))
        (tmp_path / "store" / "m" / "weights" / cp.name / file_name).write_bytes(payload)
        with pytest.raises(UserError, match=message):
            store.load_state(cp)
    assert not marker.exists()
    pickle.loads(payload)  # the payload is live: the refusal above is what kept it from running
    assert marker.exists()


def test_forward_backward_proto_roundtrip():
    datum = types.Datum(
        model_input=types.ModelInput(chunks=[types.EncodedTextChunk(tokens=[1, 2]),
                                             types.ImageChunk(data=b"\x89PNG...", format="png", expected_tokens=4),
                                             types.EncodedTextChunk(tokens=[3])]),
        loss_fn_inputs={"target_tokens": np.arange(7, dtype=np.int64), "weights": np.full(7, -0.5, np.float32)})
    request = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=[datum], loss_fn="ppo",
                                                          loss_fn_config={"clip_low_threshold": 0.7}),
        model_id="s:train:0", seq_id=5)
    call = parse_forward_backward(forward_backward_request_to_proto(request).SerializeToString())
    assert (call.model_id, call.seq_id, call.loss_fn, call.forward_only) == ("s:train:0", 5, "ppo", False)
    assert call.loss_fn_config == {"clip_low_threshold": pytest.approx(0.7)}
    chunks = call.data[0].chunks
    assert isinstance(chunks[0], TextChunk) and chunks[0].tokens.tolist() == [1, 2]
    assert isinstance(chunks[1], ImageChunk) and chunks[1].expected_tokens == 4 and chunks[1].data == b"\x89PNG..."
    np.testing.assert_array_equal(call.data[0].loss_fn_inputs["weights"], np.full(7, -0.5, np.float32))
    with pytest.raises(UserError, match="not a valid tinker ForwardBackwardRequest"):
        parse_forward_backward(b"\xff\xff\xff\x00")

    per_datum = [{"logprobs": np.array([-1.0, -2.0], np.float32), "elementwise_loss": np.zeros(2, np.float32)},
                 {"logprobs": np.array([-3.0], np.float32), "elementwise_loss": np.ones(1, np.float32)}]
    out = deserialize_forward_backward_output(encode_forward_backward_output(per_datum, {"loss:sum": 2.5}))
    assert out.metrics == {"loss:sum": 2.5}
    assert out.loss_fn_outputs[1]["logprobs"].to_numpy().tolist() == [-3.0]
    assert out.loss_fn_outputs[0]["logprobs"].shape == [2]

    sample = deserialize_sample_response(encode_sample_response(
        [{"tokens": [5, 6], "logprobs": [-0.1, -0.2], "stop_reason": "stop"}], np.array([np.nan, -1.5], np.float32)))
    assert sample.sequences[0].tokens == [5, 6] and sample.sequences[0].stop_reason == "stop"
    assert sample.prompt_logprobs[0] is None  # the SDK turns NaN (unscored) into None
    assert sample.prompt_logprobs[1] == pytest.approx(-1.5)


def test_sampling_params_mapping():
    params = vllm_sampling_params({"max_tokens": 5, "stop": [7], "temperature": 0.0, "top_k": -1, "seed": 3},
                                  2, prompt_length=10, max_model_len=100, prompt_logprobs=True)
    assert params == {"n": 2, "max_tokens": 5, "logprobs": 0, "temperature": 0.0, "top_p": 1.0, "top_k": 0,
                      "seed": 3, "stop_token_ids": [7], "prompt_logprobs": 0}
    assert vllm_sampling_params({"stop": []}, 1, 10, 100, False)["ignore_eos"] is True
    assert vllm_sampling_params({"stop": "END"}, 1, 10, 100, False)["stop"] == ["END"]
    assert vllm_sampling_params({}, 1, 10, 100, False)["max_tokens"] == 90
    with pytest.raises(UserError, match="exceeds the sampler's context"):
        vllm_sampling_params({"max_tokens": 95}, 1, 10, 100, False)
