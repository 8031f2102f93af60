"""Reliability of the Tinker server under hostile input (issue 10, item 2).

One in-process server (uvicorn thread, no sampler process: the sampler points at a closed loopback port,
so sampling requests are parsed fully and their work fails as a future) on the tiny qwen3_vl checkpoint.
Injected: fuzzed bodies (random bytes, JSON of wrong types, truncated protobuf, invalid base64 images),
oversized bodies, wrong API keys of the right length, checkpoint paths escaping the storage root, and
8 concurrent clients. Expected: 4xx answers with a message, never 5xx or a hang; the server keeps serving.
"""
from __future__ import annotations

import concurrent.futures
import inspect
import json
import os

import httpx
import numpy as np
import pytest

os.environ.setdefault("TINKER_TELEMETRY", "0")
pytest.importorskip("tinker")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402
from tinker.proto import tinker_public_pb2 as pb  # noqa: E402

from jaxrl_vl.rollout.server import free_loopback_port  # noqa: E402
from jaxrl_vl.tinker import app as tinker_app  # noqa: E402
from jaxrl_vl.tinker.protocol import UserError  # noqa: E402
from jaxrl_vl.tinker.runner import ServerThread, build_service  # noqa: E402
from jaxrl_vl.tinker.sampling import VLLMSampler  # noqa: E402
from jaxrl_vl.tinker.storage import CheckpointStore, parse_tinker_path  # noqa: E402

API_KEY = "tml-reliability-key-0123456789"
MAX_BODY_BYTES = 64 * 1024  # small, so the 413 test stays cheap
TIMEOUT = httpx.Timeout(30.0)
JSON_ROUTES = ["create_session", "session_heartbeat", "sessions/sess-x/finish", "telemetry", "create_model",
               "get_info", "optim_step", "save_weights", "save_weights_for_sampler", "load_weights",
               "create_sampling_session", "asample", "retrieve_future", "client/config"]


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    service = build_service(tiny_model_dir, str(tmp_path_factory.mktemp("tinker_store")), vllm_url=None,
                            poll_seconds=1.0)
    # A sampler on a closed port: asample parses its prompt (images included), then the work fails.
    service.sampler = VLLMSampler(f"http://127.0.0.1:{free_loopback_port()}", "base")
    thread = ServerThread(service, free_loopback_port(), api_key=API_KEY, max_body_bytes=MAX_BODY_BYTES).start()
    yield thread, service
    thread.stop()
    service.close()


@pytest.fixture(scope="module")
def http(server):
    thread, _ = server
    with httpx.Client(base_url=f"{thread.url}/api/v1", headers={"X-API-Key": API_KEY}, timeout=TIMEOUT) as c:
        yield c


@pytest.fixture(scope="module")
def model(http):
    """(session_id, model_id) of a created LoRA model, for requests that must reach deeper validation."""
    session_id = http.post("/create_session", json={}).json()["session_id"]
    created = http.post("/create_model", json={"session_id": session_id, "lora_config": {"rank": 2}}).json()
    assert http.post("/get_info", json={"model_id": created["model_id"]}).status_code == 200
    return session_id, created["model_id"]


def _assert_client_error(response: httpx.Response, what: str) -> None:
    assert 400 <= response.status_code < 500, f"{what}: HTTP {response.status_code} {response.text[:300]}"
    assert response.json().get("detail"), f"{what}: 4xx without a message: {response.text[:300]}"


def _assert_ok_or_client_error(response: httpx.Response, what: str) -> None:
    assert response.status_code < 500, f"{what}: HTTP {response.status_code} {response.text[:300]}"
    if response.status_code >= 400:
        _assert_client_error(response, what)


def _valid_fwdbwd(model_id: str) -> bytes:
    msg = pb.ForwardBackwardRequest(model_id=model_id, loss_fn="cross_entropy", forward_only=True)
    datum = msg.data.add()
    datum.model_input.add().encoded_text.tokens = bytes(range(16))
    datum.model_input.add().image.data = b"\x89PNG not really an image"
    return msg.SerializeToString()


json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() |
                           st.text(max_size=30), lambda inner: st.lists(inner, max_size=4) |
                           st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=12)
FIELDS = ["session_id", "model_id", "request_id", "path", "seq_id", "model_seq_id", "base_model", "lora_config",
          "optimizer_config", "adam_params", "reason", "prompt", "num_samples", "sampling_session_id",
          "sampling_session_seq_id", "model_path", "ttl_seconds", "user_metadata", "tags", "sampling_params"]


@st.composite
def bodies(draw, session_id: str, model_id: str):
    """(route, content bytes, content-type) over every JSON route plus forward_backward protobuf."""
    kind = draw(st.sampled_from(["bytes", "json_any", "json_fields", "truncated_proto", "bad_image"]))
    route = draw(st.sampled_from(JSON_ROUTES))
    if kind == "bytes":
        return route, draw(st.binary(max_size=200)), "application/json"
    if kind == "json_any":
        return route, json.dumps(draw(json_values)).encode(), "application/json"
    if kind == "json_fields":
        keys = draw(st.lists(st.sampled_from(FIELDS), max_size=5, unique=True))
        body = {k: draw(json_values | st.sampled_from([session_id, model_id, "../../etc", "tinker://x/weights/.."]))
                for k in keys}
        return route, json.dumps(body).encode(), "application/json"
    if kind == "truncated_proto":
        valid = _valid_fwdbwd(draw(st.sampled_from([model_id, "no-such-model"])))
        cut = draw(st.integers(0, len(valid) - 1))
        return "forward_backward", valid[:cut] + draw(st.binary(max_size=8)), "application/x-protobuf"
    data = draw(st.text(max_size=40) | st.integers() | st.none() | st.just("!!!notbase64==="))
    chunk = {"type": "image", "data": data, "format": draw(st.sampled_from(["png", "jpeg", "gif", 3]))}
    prompt = draw(st.sampled_from([{"chunks": [chunk]}, {"chunks": [chunk, "text"]}, {"chunks": chunk}, [chunk]]))
    return "asample", json.dumps({"prompt": prompt, "base_model": None}).encode(), "application/json"


def test_fuzz_every_route_answers_4xx_and_server_survives(http, model):
    session_id, model_id = model

    @settings(max_examples=150, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=bodies(session_id, model_id))
    def one(case):
        route, content, content_type = case
        response = http.post(f"/{route}", content=content, headers={"Content-Type": content_type})
        _assert_ok_or_client_error(response, f"POST /{route} {content[:120]!r}")

    one()
    # wrong types in a well-formed body are 400 with a message, not 500
    for route, body in [("create_model", {"session_id": session_id, "model_seq_id": "abc"}),
                        ("create_model", {"session_id": [1, 2]}),
                        ("sessions/x/finish", {"reason": "not-an-object"}),
                        ("asample", {"base_model": None, "prompt": {"chunks": ["not-a-chunk"]}}),
                        ("asample", {"base_model": None, "prompt": {"chunks": [{"type": "image", "data": "a"}]}}),
                        ("create_sampling_session", {"session_id": session_id, "sampling_session_seq_id": {}})]:
        _assert_client_error(http.post(f"/{route}", json=body), f"{route} {body}")
    # and the server still serves a valid request
    assert http.post("/get_info", json={"model_id": model_id}).json()["model_id"] == model_id


def test_invalid_image_in_forward_backward_fails_the_future_not_the_server(http, model):
    _, model_id = model
    response = http.post("/forward_backward", content=_valid_fwdbwd(model_id),
                         headers={"Content-Type": "application/x-protobuf"})
    assert response.status_code == 200, response.text
    request_id = response.json()["request_id"]
    for _ in range(120):
        result = http.post("/retrieve_future", json={"request_id": request_id}).json()
        if result.get("type") != "try_again":
            break
    assert result.get("category") == "user" and "image" in result["error"], result


def test_body_over_limit_gets_413(http):
    too_big = b'{"x": "' + b"a" * (MAX_BODY_BYTES + 10) + b'"}'
    response = http.post("/create_session", content=too_big, headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and "limit" in response.json()["detail"]

    def chunked():  # no Content-Length: the limit must hold on the streamed bytes too
        for _ in range(MAX_BODY_BYTES // 1024 + 2):
            yield b"a" * 1024

    response = http.post("/forward_backward", content=chunked(), headers={"Content-Type": "application/x-protobuf"})
    assert response.status_code == 413, response.text
    assert http.post("/create_session", json={}).status_code == 200


def test_saved_optimizer_state_loads_back_bitwise(server):
    """save_state -> load_state(with optimizer) restores the LoRA tree, the AdamW state (same optax
    NamedTuple structure, every array bitwise) and the step, through the non-executable format."""
    import jax

    _, service = server
    backend = service.backend
    model = backend.create_model("bitwise:train:0", "bitwise", {"rank": 2})
    rng = np.random.default_rng(0)
    randomize = lambda tree: jax.tree_util.tree_map(  # noqa: E731 - non-trivial values of each leaf's dtype
        lambda x: np.asarray(rng.standard_normal(np.shape(x)) * 7, dtype=np.asarray(x).dtype), tree)
    model.lora, model.opt_state, model.step = randomize(model.lora), randomize(model.opt_state), 5
    saved_lora, saved_opt = jax.device_get(model.lora), jax.device_get(model.opt_state)
    path = backend.save_state(model.model_id, "bitwise")
    model.lora, model.opt_state, model.step = randomize(model.lora), randomize(model.opt_state), 0
    backend.load_state(model.model_id, parse_tinker_path(path), with_optimizer=True)
    assert model.step == 5
    for saved, loaded in ((saved_lora, model.lora), (saved_opt, model.opt_state)):
        assert jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(saved)
        for a, b in zip(jax.tree_util.tree_leaves(saved), jax.tree_util.tree_leaves(loaded)):
            b = np.asarray(b)
            assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def test_api_key_is_compared_in_constant_time(server):
    thread, _ = server
    source = inspect.getsource(tinker_app.create_app)
    assert "compare_digest(" in source and "== api_key" not in source and "!= api_key" not in source
    wrong_same_length = API_KEY[:-1] + ("x" if API_KEY[-1] != "x" else "y")
    for headers in ({"X-API-Key": wrong_same_length}, {"Authorization": f"Bearer {wrong_same_length}"}, {},
                    {"X-API-Key": ("é" * (len(API_KEY) // 2)).encode()}):  # non-ASCII must not crash compare_digest
        response = httpx.post(f"{thread.url}/api/v1/create_session", json={}, headers=headers, timeout=TIMEOUT)
        _assert_client_error(response, f"headers {headers}")
        assert response.status_code == 401


ESCAPES = ["tinker://../weights/x", "tinker://a/weights/..", "tinker://a/weights/../../etc",
           "tinker:///etc/weights/passwd", "tinker://a/weights//etc/passwd", "/etc/passwd", "../../x",
           "tinker://a/weights/x\x00y", "tinker://a/weights/%2e%2e", "file:///etc/passwd"]


def test_checkpoint_paths_cannot_escape_storage(http, model, server, tmp_path):
    _, service = server
    session_id, model_id = model
    for path in ESCAPES:
        with pytest.raises(UserError):
            service.store.load_state(parse_tinker_path(path))
        _assert_client_error(http.post("/load_weights", json={"path": path, "session_id": session_id}), path)
        _assert_client_error(http.post("/create_sampling_session",
                                       json={"session_id": session_id, "model_path": path}), path)
    for name in ["../../escape", "/abs", "a/b", ".."]:  # save names resolve as the NAME segment
        response = http.post("/save_weights", json={"model_id": model_id, "path": name})
        if response.status_code < 400:  # the name is checked on the worker: the future must fail as "user"
            request_id = response.json()["request_id"]
            for _ in range(60):
                result = http.post("/retrieve_future", json={"request_id": request_id}).json()
                if result.get("type") != "try_again":
                    break
            assert result.get("category") == "user", (name, result)
        else:
            _assert_client_error(response, name)
    escaped = [p for p in (tmp_path.parent / "escape", tmp_path.parent.parent / "escape") if p.exists()]
    assert not escaped
    # a symlink inside the store that points outside is refused, for reads and deletes
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "state.msgpack").write_bytes(b"not for you")
    store = CheckpointStore(str(tmp_path / "store"))
    os.makedirs(os.path.join(store.root, "m", "weights"))
    os.symlink(outside, os.path.join(store.root, "m", "weights", "link"))
    cp = parse_tinker_path("tinker://m/weights/link")
    for action in (store.load_state, store.delete, store.sampler_dir):
        with pytest.raises(UserError):
            action(cp)
    assert (outside / "state.msgpack").read_bytes() == b"not for you"
    for encoded in ("weights/..%2F..%2F..%2Fx", "weights/%2E%2E", "..%2F..%2Fweights%2Fx"):  # %-encoded so the
        # client does not normalize the dots away; the server decodes them into the path parameter
        response = http.delete(f"/training_runs/{model_id}/checkpoints/{encoded}")
        _assert_client_error(response, encoded)
        assert response.status_code in (400, 404), (encoded, response.status_code)
    assert os.path.isdir(service.store.root)


def test_concurrent_clients_get_every_future_once(server, model):
    """8 clients x 50 requests (create_session + get_info + a create_model future and its result)."""
    thread, _ = server
    _, model_id = model

    def client_run(index: int) -> list[str]:
        ids = []
        with httpx.Client(base_url=f"{thread.url}/api/v1", headers={"X-API-Key": API_KEY}, timeout=TIMEOUT) as c:
            session_id = c.post("/create_session", json={}).json()["session_id"]
            for i in range(50):
                if i % 10 == 0:  # a future per 10 requests: creation of a fresh model (cheap, on the JAX thread)
                    r = c.post("/create_model", json={"session_id": session_id, "model_seq_id": i,
                                                      "lora_config": {"rank": 1}}).json()
                    ids.append(r["request_id"])
                    while (res := c.post("/retrieve_future", json={"request_id": r["request_id"]}).json()).get(
                            "type") == "try_again":
                        pass
                    assert res == {"model_id": r["model_id"], "type": "create_model"}, res
                elif i % 2:
                    assert c.post("/get_info", json={"model_id": model_id}).status_code == 200
                else:
                    assert c.post("/session_heartbeat", json={"session_id": session_id}).status_code == 200
        return ids

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        all_ids = [i for ids in pool.map(client_run, range(8)) for i in ids]
    assert len(all_ids) == 40 and len(set(all_ids)) == 40


def test_launcher_max_body_bytes_flag_sets_the_limit(tiny_model_dir, tmp_path):
    """`launch/tinker_server.py --max-body-bytes N` answers 413 above N bytes and serves below it."""
    import subprocess
    import sys
    import time

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    port = free_loopback_port()
    log_path = tmp_path / "tinker_server.log"
    with open(log_path, "w") as log_file:
        process = subprocess.Popen([sys.executable, os.path.join(repo, "launch", "tinker_server.py"),
                                    "--base-model", tiny_model_dir, "--no-vllm", "--port", str(port),
                                    "--storage-root", str(tmp_path / "store"), "--max-body-bytes", "3000"],
                                   stdout=log_file, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/api/v1"
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, log_path.read_text()[-3000:]
            try:
                if httpx.get(f"{url}/healthz", timeout=2.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.5)
        small = {"session_id": "s", "tags": ["x" * 1000]}
        large = {"session_id": "s", "tags": ["x" * 4000]}
        assert httpx.post(f"{url}/create_session", json=small, timeout=TIMEOUT).status_code == 200
        response = httpx.post(f"{url}/create_session", json=large, timeout=TIMEOUT)
        assert response.status_code == 413 and "3000" in response.json()["detail"], response.text
    finally:
        process.terminate()
        process.wait(timeout=60)
    import importlib.util
    spec = importlib.util.spec_from_file_location("tinker_server_launch", os.path.join(repo, "launch", "tinker_server.py"))
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    with pytest.raises(SystemExit):  # argparse refuses a non-positive limit
        launcher.parse_args(["--base-model", tiny_model_dir, "--max-body-bytes", "0"])
