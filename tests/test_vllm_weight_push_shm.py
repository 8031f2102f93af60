"""The `shm` weight push into the real CPU vLLM server of the session (jaxrl_vl.rollout.weight_shm).

The server's model reads the shared-memory slot the trainer wrote (no server-side copy; its linear
layers re-packed by vLLM's own CPU GEMM dispatch): the logprobs it then gives equal those of vLLM's own
reload of the same weights bit for bit (which agree with transformers': test_vllm_weight_push.py); a
push refused before writing (wrong shape) or a commit of a slot whose write did not finish leaves the
old weights and version; the `reload` transport and `shm` alternate on one server; restoring the
weights restores the logprobs bit for bit.
"""
import asyncio
import re

import numpy as np
import pytest

from jaxrl_vl.rollout import weight_routes, weight_shm
from jaxrl_vl.rollout.client import VLLMClient, sampled_logprobs, weight_versions
from jaxrl_vl.rollout.weight_push import WeightPushError, push_state_dict, server_weight_version

pytestmark = pytest.mark.vllm
PROMPT = list(range(40, 72))
SAMPLING = {"temperature": 1.0, "max_tokens": 8, "seed": 7, "logprobs": 0, "ignore_eos": True}


def test_shm_push_matches_reload_and_refuses_unfinished_writes(vllm_server, tiny_model_dir):
    from safetensors.numpy import load_file

    original = load_file(f"{tiny_model_dir}/model.safetensors")
    rng = np.random.default_rng(3)
    perturbed = {k: v + np.float32(0.03) * rng.standard_normal(v.shape, dtype=np.float32) for k, v in original.items()}

    async def sample(client):
        choice = (await client.generate(PROMPT, SAMPLING))["choices"][0]
        return choice["token_ids"], sampled_logprobs(choice), weight_versions(choice)

    async def main():
        async with VLLMClient(vllm_server.url, vllm_server.served_model_name, max_retries=1,
                              backoff_seconds=0.05) as client:
            out = {}
            # vLLM's own reload first: it leaves its loader wrappers on the metadata the shm layout reads
            await push_state_dict(original, [client], version="base", transport="reload")
            first = await push_state_dict(original, [client], version="base", transport="shm")
            out["base"] = await sample(client)
            # a tensor of the wrong shape: refused before anything is written
            wrong = {**perturbed, "lm_head.weight": perturbed["lm_head.weight"][:-1]}
            with pytest.raises(WeightPushError, match="refused before writing.*keeps its weights") as caught:
                await push_state_dict(wrong, [client], version=90, transport="shm")
            out["wrong_shape"] = (str(caught.value), await sample(client), await server_weight_version(client))
            # a trainer that died half way: the perturbed weights are in the free slot, its header has
            # no nonce; a commit naming a nonce is refused and the model keeps reading the old slot
            slots = weight_shm._SLOTS[client.base_url]
            free = 1 - slots.active
            weight_shm._write_slot(slots, perturbed, free)
            slots.maps[free][:8] = bytes(8)
            with pytest.raises(weight_routes.PushRejected, match="did not finish.*model unchanged") as caught:
                await weight_routes.commit(client, 91, pause_mode="wait",
                                           shm={"slot": free, "nonce": 12345, "layout_id": slots.layout_id})
            out["unfinished"] = (str(caught.value), await sample(client), await server_weight_version(client))
            # the same weights through vLLM's own reload, then through shm, then the originals again
            await push_state_dict(perturbed, [client], version=1, transport="reload")
            out["reload"] = await sample(client)
            pushed = await push_state_dict(perturbed, [client], version=2, transport="shm")
            out["shm"] = await sample(client)
            await push_state_dict(original, [client], version="base", transport="shm")
            out["restored"] = await sample(client)
            return first, pushed, out

    first, pushed, out = asyncio.run(main())
    assert first.phase_seconds["layout"] > 0 and pushed.phase_seconds["server_worker"] > 0
    assert pushed.write_seconds > 0 and pushed.num_tensors == len(original)
    base_tokens, base_logprobs, base_versions = out["base"]
    assert base_versions == ["base"]
    for fault in ("wrong_shape", "unfinished"):
        message, after, version = out[fault]
        assert after == out["base"] and version == "base", (fault, message)
    assert "lm_head.weight" in out["wrong_shape"][0]
    reload_tokens, reload_logprobs, reload_versions = out["reload"]
    shm_tokens, shm_logprobs, shm_versions = out["shm"]
    assert reload_versions == ["1"] and shm_versions == ["2"]
    assert shm_tokens == reload_tokens and reload_logprobs != base_logprobs
    assert shm_logprobs == reload_logprobs  # bit for bit: the same packed GEMMs
    assert out["restored"] == out["base"]  # bit for bit


def test_push_while_generating_pauses_and_an_idle_push_takes_one_engine_call(vllm_server, tiny_model_dir):
    """An idle engine loads in one engine-core call (no pause: plugin engine_core.py); with a request
    running, the commit pauses as usual: mode "wait" lets it finish on the old weights first."""
    from safetensors.numpy import load_file

    original = load_file(f"{tiny_model_dir}/model.safetensors")

    async def main():
        async with VLLMClient(vllm_server.url, vllm_server.served_model_name) as client:
            idle = await push_state_dict(original, [client], version="idle", transport="shm")
            busy = finished = None
            version = "idle"  # the server's version when the long request starts
            for attempt in range(5):  # this host sometimes stalls a process for seconds: retry until the
                # push lands while the long request is still being decoded
                running = asyncio.create_task(client.generate(PROMPT, {**SAMPLING, "max_tokens": 1900}))
                if not await _until_a_request_runs(client, running):
                    await running  # decoded (or failed: raises) before the gauge showed it: again
                    continue
                busy = await push_state_dict(original, [client], version=f"busy{attempt}", transport="shm",
                                             pause_mode="wait")
                finished = (await running)["choices"][0]
                if "server_pause" in busy.phase_seconds:
                    break
                version = f"busy{attempt}"
            after = (await client.generate(PROMPT, SAMPLING))["choices"][0]
            return idle, busy, finished, after, version

    idle, busy, finished, after, version = asyncio.run(main())
    assert "server_load" in idle.phase_seconds and "server_pause" not in idle.phase_seconds
    assert busy is not None, "no push landed while the long request was running, in 5 attempts"
    assert "server_pause" in busy.phase_seconds and "server_resume" in busy.phase_seconds
    assert len(finished["token_ids"]) == 1900 and weight_versions(finished) == [version]
    assert weight_versions(after) == [busy.version]


async def _until_a_request_runs(client, running: asyncio.Task, timeout_seconds: float = 30.0) -> bool:
    """Polls the server's Prometheus gauge (summed over its label sets) until the engine schedules a request:
    True; False if `running` finished first or nothing ran within the timeout."""
    deadline = asyncio.get_running_loop().time() + timeout_seconds
    while asyncio.get_running_loop().time() < deadline and not running.done():
        metrics = await client.request("GET", "/metrics")
        if sum(float(v) for v in re.findall(r"^vllm:num_requests_running\{[^}]*\} (\S+)", metrics, re.M)) > 0:
            return True
        await asyncio.sleep(0.01)
    return False
