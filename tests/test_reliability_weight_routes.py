"""The vLLM-side weight routes refuse pushes without the shared token (issue 10, item 3).

launch/vllm_token_auth.RequireBearerToken wraps a tiny Starlette app standing in for vLLM's router (no vLLM
needed: the middleware is pure ASGI and only sees scopes). Injected: weight pushes with no token, a wrong
token of the same length, other schemes, padded/prefixed tokens, non-ASCII header bytes, path tricks and a
websocket. Expected: 401 (or websocket close 1008) and the wrapped app is never called, so no weight
bytes are read and the served version never changes.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "launch"))
import vllm_token_auth  # noqa: E402  (standalone module, as vLLM imports it)

TOKEN = "0123456789abcdef" * 4
WEIGHT_ROUTES = ("/update_weights", "/init_weight_transfer_engine", "/update_weight_version", "/collective_rpc",
                 "/pause", "/resume", "/reset_prefix_cache")


class FakeWeightServer:
    """Records every call that got past the middleware; a push bumps the served weight version."""

    def __init__(self):
        self.calls: list[str] = []
        self.version = 0

    async def push(self, request: Request):
        self.calls.append(request.url.path)
        await request.body()
        self.version += 1
        return JSONResponse({"version": self.version})

    async def stream(self, websocket):
        self.calls.append("ws")
        await websocket.accept()
        await websocket.close()

    def app(self):
        routes = [Route("/health", lambda _: JSONResponse({"version": self.version})),
                  *[Route(p, self.push, methods=["GET", "POST"]) for p in WEIGHT_ROUTES]]
        starlette = Starlette(routes=[*routes, WebSocketRoute("/ws_weights", self.stream)])
        return vllm_token_auth.RequireBearerToken(starlette, environ={vllm_token_auth.TOKEN_ENV: TOKEN})


@pytest.fixture
def server():
    fake = FakeWeightServer()
    return fake, TestClient(fake.app())


def test_pushes_without_the_right_token_never_reach_the_weight_routes(server):
    fake, client = server
    wrong_same_length = TOKEN[:-1] + "X"
    bad_headers = [{}, {"Authorization": ""}, {"Authorization": "Bearer"}, {"Authorization": "Bearer "},
                   {"Authorization": f"Bearer {wrong_same_length}"}, {"Authorization": f"Basic {TOKEN}"},
                   {"Authorization": TOKEN}, {"Authorization": f"Bearer  {TOKEN}"},
                   {"Authorization": f"Bearer {TOKEN} "}, {"Authorization": f"Bearer {TOKEN}x"},
                   {"Authorization": f"Bearer {TOKEN[:-1]}"}, {"X-API-Key": TOKEN},
                   {"Authorization": ("Bearer " + "é" * 32).encode()}, {"Authorization": b"Bearer \xff\xfe"}]
    weights = b"\x00" * 4096  # a stand-in weight payload
    for path in WEIGHT_ROUTES:
        for headers in bad_headers:
            response = client.post(path, content=weights, headers=headers)
            assert response.status_code == 401, (path, headers, response.status_code)
            assert "Bearer" in response.json()["error"]
    for path in ("/health/../update_weights", "/update_weights/", "//update_weights", "/Health"):
        assert client.post(path, content=weights).status_code in (401, 404), path
    assert fake.calls == [] and fake.version == 0
    with pytest.raises(WebSocketDisconnect) as closed:
        with client.websocket_connect("/ws_weights") as websocket:
            websocket.receive_text()
    assert closed.value.code == 1008 and fake.calls == []


def test_the_right_token_pushes_and_health_stays_open(server):
    fake, client = server
    assert client.get("/health").json() == {"version": 0}
    for scheme in ("Bearer", "bearer"):
        response = client.post("/update_weights", content=b"w", headers={"Authorization": f"{scheme} {TOKEN}"})
        assert response.status_code == 200
    assert fake.version == 2 and fake.calls == ["/update_weights", "/update_weights"]


def test_token_comparison_is_constant_time():
    source = Path(vllm_token_auth.__file__).read_text()
    assert "hmac.compare_digest(" in source and "== self._digest" not in source
