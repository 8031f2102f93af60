"""Partial and corrupt weight pushes into the real CPU vLLM server leave it on its old weights (issue 10).

Injected, for the `stream` transport (plugins/vllm_weight_stream stages and validates before it
swaps): a truncated stream (chunks missing, commit claims all), a chunk corrupted in transit (crc32),
a tensor of the wrong shape, a missing tensor, and a trainer that dies mid-stream leaving the update
session open. For `reload`: a truncated safetensors file, a missing tensor and a wrong shape in the
folder. Each push carries weights that WOULD change the logprobs (a perturbed model); afterwards a
seeded sample gives exactly the old tokens and logprobs and the old weight version.
"""
import asyncio
import base64

import numpy as np
import pytest

from jaxrl_vl.rollout.client import VLLMClient, VLLMError, sampled_logprobs, weight_versions
from jaxrl_vl.rollout.weight_push import (WeightPushError, _chunk_message, _commit_message, push_state_dict,
                                          reload_from_folder, server_weight_version, state_chunks, write_weights)

pytestmark = pytest.mark.vllm
PROMPT = list(range(40, 60))
SAMPLING = {"temperature": 1.0, "max_tokens": 8, "seed": 5, "logprobs": 0, "ignore_eos": True}


def _states(model_dir: str) -> tuple[dict, dict]:
    from safetensors.numpy import load_file

    original = load_file(f"{model_dir}/model.safetensors")
    rng = np.random.default_rng(1)
    perturbed = {k: v + np.float32(0.05) * rng.standard_normal(v.shape, dtype=np.float32) for k, v in original.items()}
    return original, perturbed


async def _sample(client: VLLMClient) -> tuple[list[int], list[float], list[str]]:
    choice = (await client.generate(PROMPT, SAMPLING))["choices"][0]
    return choice["token_ids"], sampled_logprobs(choice), weight_versions(choice)


def _run(server, scenario):
    async def main():
        # One retry, for transport errors only (a 4xx/500 is never retried): after an unhandled error
        # uvicorn closes the keep-alive connection, and the next call on the pooled socket reads EOF.
        async with VLLMClient(server.url, server.served_model_name, max_retries=1, backoff_seconds=0.05) as client:
            return await scenario(client)
    return asyncio.run(main())


def test_partial_or_corrupt_stream_push_keeps_old_weights_and_version(vllm_server, tiny_model_dir):
    original, perturbed = _states(tiny_model_dir)

    async def raw_push(client, messages):
        """Drives the stream routes by hand (as a faulty trainer would); returns the first error."""
        await client.request("POST", "/pause", params={"mode": "wait", "clear_cache": "true"})
        try:
            await client.request("POST", "/start_weight_update")
            for message in messages:
                await client.request("POST", "/update_weights", json={"update_info": message})
            await client.request("POST", "/finish_weight_update", json={"weight_version": "999"})
            return None
        except VLLMError as error:
            return error
        finally:
            await client.request("POST", "/resume")

    async def scenario(client):
        # the session's server was started with the stream backend; make sure it serves the checkpoint
        await push_state_dict(original, [client], version="base", transport="stream")
        before = await _sample(client)
        chunks = [{n: np.ascontiguousarray(a) for n, a in c.items()} for c in state_chunks(perturbed, 1_000_000)]
        messages = [_chunk_message(i, c) for i, c in enumerate(chunks)]
        sent = {n: (str(a.dtype), list(a.shape), a.nbytes) for c in chunks for n, a in c.items()}
        assert len(messages) >= 3
        corrupted = dict(messages[1])
        blob = bytearray(base64.b64decode(corrupted["safetensors_b64"]))
        blob[-5] ^= 0xFF  # one flipped bit pattern inside tensor data: still parses, crc32 must catch it
        corrupted["safetensors_b64"] = base64.b64encode(bytes(blob)).decode()
        errors = {
            "truncated": await raw_push(client, [messages[0], _commit_message(sent, len(messages))]),
            "corrupt": await raw_push(client, [messages[0], corrupted]),
        }
        outcomes = {name: (error, await _sample(client), await server_weight_version(client))
                    for name, error in errors.items()}
        for name, state in {"wrong_shape": {**perturbed, "lm_head.weight": perturbed["lm_head.weight"][:, :-1]},
                            "missing": {k: v for k, v in perturbed.items() if k != "model.visual.merger.norm.weight"}
                            }.items():
            with pytest.raises(WeightPushError) as caught:
                await push_state_dict(state, [client], version=998, transport="stream", chunk_bytes=1_000_000)
            outcomes[name] = (caught.value, await _sample(client), await server_weight_version(client))
        # a trainer dies mid-stream: the session stays open; the next push aborts it and succeeds
        await client.request("POST", "/start_weight_update")
        await client.request("POST", "/update_weights", json={"update_info": messages[0]})
        await push_state_dict(original, [client], version="base", transport="stream")
        after_recovery = await _sample(client)
        return before, outcomes, after_recovery

    before, outcomes, after_recovery = _run(vllm_server, scenario)
    expected_messages = {"truncated": "incomplete push: 1 of", "corrupt": "crc32 mismatch",
                         "wrong_shape": "lm_head.weight has shape", "missing": "lacks 1 weights"}
    for name, (error, sample, version) in outcomes.items():
        assert expected_messages[name] in str(error), (name, str(error)[:2000])
        assert sample == before, name  # same tokens, bit-identical logprobs, old version label
        assert version == "base" and sample[2] == ["base"], name
    assert after_recovery == before


@pytest.mark.parametrize("fault", ["truncated_file", "missing_tensor", "wrong_shape"])
def test_corrupt_reload_folder_is_refused_before_loading(vllm_server, tiny_model_dir, tmp_path, fault):
    original, perturbed = _states(tiny_model_dir)
    folder = tmp_path / "weights"
    expected = {n: (str(a.dtype), a.shape) for n, a in perturbed.items()}
    if fault == "missing_tensor":
        write_weights({k: v for k, v in perturbed.items() if k != "lm_head.weight"}, folder)
    elif fault == "wrong_shape":
        write_weights({**perturbed, "lm_head.weight": perturbed["lm_head.weight"].T.copy()}, folder)
    else:
        write_weights(perturbed, folder)
        path = folder / "model.safetensors"
        path.write_bytes(path.read_bytes()[:-1000])

    async def scenario(client):
        await push_state_dict(original, [client], version="base", transport="reload", root=str(tmp_path))
        before = await _sample(client)
        with pytest.raises(WeightPushError, match="refused before loading.*keeps its weights") as caught:
            await reload_from_folder(client, str(folder), version=997, expected=expected)
        return before, caught.value, await _sample(client), await server_weight_version(client)

    before, error, after, version = _run(vllm_server, scenario)
    assert after == before and version == "base", str(error)
    assert {"truncated_file": "truncated", "missing_tensor": "missing ['lm_head.weight']",
            "wrong_shape": "dtype/shape differ"}[fault] in str(error)
