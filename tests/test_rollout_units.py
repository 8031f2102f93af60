"""Unit tests of the rollout plumbing that need no server: pool routing, server command line,
the kwargs_data decoder's format checks, message conversion, client retries and errors."""
import asyncio
import base64
import dataclasses
import json
import os

import httpx
import msgpack
import numpy as np
import pytest
from PIL import Image

from jaxrl_vl.rollout import mm_decode
from jaxrl_vl.rollout.client import ContextLengthError, VLLMClient, VLLMError
from jaxrl_vl.rollout.messages import to_openai_messages
from jaxrl_vl.rollout.server import (SHM_WORKER_EXTENSION, VLLM_PLUGIN_NAMES, ServerConfig, ServerHandle,
                                     server_command, stop_server)
from jaxrl_vl.rollout.server_pool import ServerPool


def test_pool_sticks_episodes_and_balances_new_ones():
    pool = ServerPool(["http://a", "http://b/"])
    assert pool.assign("e1") == "http://a" and pool.assign("e2") == "http://b"
    assert pool.assign("e1") == "http://a"  # every turn of e1 on the same server
    pool.release("e1")
    assert pool.assign("e3") == "http://a"  # a now has fewer active episodes
    assert pool.assign("e4") == "http://a"  # tie (1 and 1): list order
    assert pool.load() == {"http://a": 2, "http://b": 1}
    pool.release("e2")
    pool.release("unknown")  # ignored
    assert pool.assign("e5") == "http://b" and pool.load() == {"http://a": 2, "http://b": 1}
    with pytest.raises(ValueError, match="duplicate"):
        ServerPool(["http://a", "http://a"])


def test_pool_broadcast_reaches_all_and_names_failures():
    pool = ServerPool(["http://a", "http://b", "http://c"])
    seen = []

    async def push(url):
        seen.append(url)
        if url == "http://b":
            raise ConnectionError("refused")
        return url.upper()

    with pytest.raises(RuntimeError, match=r"1 of 3 servers: http://b: ConnectionError: refused"):
        asyncio.run(pool.broadcast(push))
    assert sorted(seen) == ["http://a", "http://b", "http://c"]
    assert asyncio.run(pool.broadcast(lambda u: asyncio.sleep(0, result=u))) == pool.urls


def test_server_command_cpu_and_gpu_flags(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    cpu = ServerConfig(model=str(tmp_path), launcher="/bin/vllm", cpu_kv_cache_gib=2)
    argv, env = server_command(cpu, 1234)
    assert argv[:3] == ["/bin/vllm", "serve", str(tmp_path)]
    assert argv[argv.index("--host") + 1] == "127.0.0.1" and argv[argv.index("--port") + 1] == "1234"
    assert "--enable-scale-out" in argv and argv[argv.index("--dtype") + 1] == "float32"
    assert json.loads(argv[argv.index("--limit-mm-per-prompt") + 1]) == {"image": 4, "video": 0}
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2" and env["VLLM_SERVER_DEV_MODE"] == "1" and env["HF_HUB_OFFLINE"] == "1"
    assert env["VLLM_PLUGINS"].split(",") == list(VLLM_PLUGIN_NAMES)  # our backend and weight-push routes
    assert "--worker-extension-cls" not in argv  # the shm transport's worker methods only when asked for
    assert env.get("VLLM_CPU_OMP_THREADS_BIND") == os.environ.get("VLLM_CPU_OMP_THREADS_BIND")  # "auto": untouched
    _, env = server_command(dataclasses.replace(cpu, cpu_cores="all"), 1234)
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == ",".join(map(str, sorted(os.sched_getaffinity(0))))
    assert server_command(dataclasses.replace(cpu, cpu_cores="0-3,6"), 1)[1]["VLLM_CPU_OMP_THREADS_BIND"] == "0-3,6"
    with pytest.raises(ValueError, match="cpu_cores='most'"):
        server_command(dataclasses.replace(cpu, cpu_cores="most"), 1)
    argv, _ = server_command(dataclasses.replace(cpu, shm_weights=True), 1234)
    assert argv[argv.index("--worker-extension-cls") + 1] == SHM_WORKER_EXTENSION
    with pytest.raises(ValueError, match="shm_weights=True needs device='cpu' and enforce_eager=True"):
        server_command(dataclasses.replace(cpu, shm_weights=True, enforce_eager=False), 1)
    gpu = ServerConfig(model=str(tmp_path), launcher="vllm", device="gpu", cuda_visible_devices="1", enforce_eager=False,
                       enable_lora=True, weight_transfer_backend="jaxrl_stream")
    argv, env = server_command(gpu, 1)
    assert json.loads(argv[argv.index("--weight-transfer-config") + 1]) == {"backend": "jaxrl_stream"}
    assert "--gpu-memory-utilization" in argv and "--enforce-eager" not in argv and "--enable-lora" in argv
    assert "VLLM_CPU_KVCACHE_SPACE" not in env and env["CUDA_VISIBLE_DEVICES"] == "1"
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    with pytest.raises(ValueError, match="cpu_kv_cache_gib=0.5"):
        server_command(ServerConfig(model=str(tmp_path), launcher="vllm", cpu_kv_cache_gib=0.5), 1)
    with pytest.raises(ValueError, match="device='tpu'"):
        server_command(ServerConfig(model=str(tmp_path), launcher="vllm", device="tpu"), 1)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        server_command(ServerConfig(model=str(tmp_path / "missing"), launcher="vllm"), 1)
    with pytest.raises(FileNotFoundError, match="make install-vllm"):
        server_command(ServerConfig(model=str(tmp_path), vllm_venv=str(tmp_path / "no-venv")), 1)
    assert stop_server(ServerHandle(url="http://x", served_model_name="m")) is None  # attached: not ours


def _encode_item(fields: dict) -> str:
    """Writes the msgpack layout of vLLM's MsgpackEncoder (dtype name, shape, Ext(3, bytes))."""
    item = {name: {"data": [str(a.dtype), list(a.shape), msgpack.ExtType(3, a.tobytes())],
                   "field": ["batched", {"keep_on_cpu": True}]} for name, a in fields.items()}
    return base64.b64encode(msgpack.packb(item)).decode()


def test_mm_decode_reads_items_and_checks_them():
    pixels = np.arange(16 * 12, dtype=np.uint8).reshape(16, 12)
    grid = np.array([1, 4, 4], np.int64)
    features = {"kwargs_data": {"image": [_encode_item({"pixel_values": pixels, "image_grid_thw": grid})] * 2},
                "mm_placeholders": {"image": [{"offset": 3, "length": 4}, {"offset": 9, "length": 4}]}}
    decoded_pixels, decoded_grid = mm_decode.decode_images(features)
    np.testing.assert_array_equal(decoded_pixels, np.concatenate([pixels, pixels]))
    np.testing.assert_array_equal(decoded_grid, [[1, 4, 4], [1, 4, 4]])
    assert mm_decode.decode_images(None)[1].shape == (0, 3)
    features["mm_placeholders"]["image"][1]["length"] = 5
    with pytest.raises(ValueError, match="placeholder length 5"):
        mm_decode.decode_images(features)
    bad = base64.b64encode(msgpack.packb({"pixel_values": {"data": ["uint8", [2], msgpack.ExtType(1, b"xx")],
                                                           "field": None}})).decode()
    with pytest.raises(ValueError, match="extension type 1"):
        mm_decode.decode_kwargs_item(bad)
    normalized = mm_decode.normalize_pixels(np.full((1, 6), 255, np.uint8), [0.5, 0.5, 0.5], [0.5, 0.25, 0.5])
    np.testing.assert_allclose(normalized, [[1, 1, 2, 2, 1, 1]])


def test_to_openai_messages_converts_images_and_tool_calls(tmp_path):
    image = Image.new("RGB", (8, 6), (255, 0, 0))
    image.save(tmp_path / "x.png")
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "hi"},
                                             {"type": "image", "image": "x.png"}]},
                {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": {"a": 1}}}]}]
    out = to_openai_messages(messages, base_dir=tmp_path)
    urls = [c["image_url"]["url"] for c in out[0]["content"] if c["type"] == "image_url"]
    assert len(urls) == 2 and all(u.startswith("data:image/png;base64,") for u in urls)
    assert out[1]["content"] is None and out[1]["tool_calls"][0]["function"]["arguments"] == '{"a": 1}'
    with pytest.raises(ValueError, match=r"messages\[0\].role='bot'"):
        to_openai_messages([{"role": "bot", "content": "x"}])
    with pytest.raises(FileNotFoundError, match="missing.png"):
        to_openai_messages([{"role": "user", "content": [{"type": "image", "image": "missing.png"}]}], tmp_path)


def test_client_retries_transient_errors_and_quotes_the_server():
    calls = {"n": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        if request.url.path == "/inference/v1/generate" and calls["n"] < 3:
            return httpx.Response(503, json={"error": {"message": "engine busy"}})
        if request.url.path == "/inference/v1/generate":
            return httpx.Response(200, json={"choices": [{"token_ids": [1]}]})
        return httpx.Response(400, json={"error": {"message": "The decoder prompt (length 3000) is longer than "
                                                              "the maximum model length of 2048. Make sure"}})

    async def scenario():
        client = VLLMClient("http://test", "m", backoff_seconds=0.0)
        client._http = httpx.AsyncClient(base_url="http://test", transport=httpx.MockTransport(handler))
        ok = await client.generate([1, 2], {"max_tokens": 1})
        with pytest.raises(ContextLengthError, match="3000 tokens.*2048"):
            await client.request("POST", "/v1/chat/completions/render", json={})
        client.max_retries = 1
        calls["n"] = 0
        with pytest.raises(VLLMError, match="after 2 attempts.*engine busy"):
            await client.generate([1], {"max_tokens": 1})
        await client.aclose()
        return ok

    assert asyncio.run(scenario())["choices"][0]["token_ids"] == [1]


def test_stream_chunks_are_bounded_and_complete():
    from jaxrl_vl.rollout.weight_push import state_chunks

    state = {f"layer.{i}.weight": np.full((i + 1, 100), i, np.float32) for i in range(6)}  # 400..2400 bytes
    state["big"] = np.zeros((10, 1000), np.float32)  # 40 kB: larger than a chunk, travels alone
    chunks = list(state_chunks(state, chunk_bytes=3000))
    assert sorted(n for c in chunks for n in c) == sorted(state)
    assert all(sum(a.nbytes for a in c.values()) <= 3000 for c in chunks if "big" not in c)
    assert [list(c) for c in chunks if "big" in c] == [["big"]]
