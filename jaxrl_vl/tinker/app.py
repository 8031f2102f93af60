"""FastAPI routes of the Tinker-compatible server (SDK tinker==0.38.0; see ../shared/notes/tinker.md).

Error shapes:
  - an undecodable body (bad JSON / protobuf) or a missing field: HTTP 400 {"detail": msg}
    (the SDK raises tinker.BadRequestError at once);
  - an unknown model / future id: HTTP 404 {"detail": msg} (tinker.NotFoundError);
  - a missing/wrong API key (when the server has one): HTTP 401 {"detail": msg};
  - a body over `max_body_bytes` (declared by Content-Length or streamed): HTTP 413 {"detail": msg};
  - a field of the wrong type (e.g. a string where an int is needed): HTTP 400 {"detail": msg};
  - work that fails (bad expected_tokens, unsupported loss, ...): the future resolves to
    {"error": msg, "category": "user"|"server"} (tinker.RequestFailedError). Such failures never stop
    the server.
"""
from __future__ import annotations

import hmac
import json
import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from jaxrl_vl.tinker.futures import Failure
from jaxrl_vl.tinker.protocol import NotFoundError, UserError, parse_forward_backward
from jaxrl_vl.tinker.service import TinkerService
from jaxrl_vl.tinker.storage import parse_tinker_path

log = logging.getLogger("jaxrl_vl.tinker")
PROTOBUF = "application/x-protobuf"
CLIENT_CONFIG = {"pjwt_auth_enabled": False, "proto_compress_fwdbwd": False, "sample_use_retrieve_futures": False,
                 "custom_loss_server_side": False, "sample_join_sampling_session": False,
                 # chunks of one forward_backward arrive one after another, in seq_id order
                 "parallel_fwdbwd_chunks": False}
# Large enough for forward_backward batches with several images; small enough that one request
# cannot exhaust host memory.
DEFAULT_MAX_BODY_BYTES = 256 * 1024 * 1024


class BodyTooLarge(Exception):
    pass


class BodySizeLimit:
    """ASGI middleware: answers 413 for bodies over max_body_bytes, declared (Content-Length) or streamed
    (chunked), before the route reads them into memory."""

    def __init__(self, app, max_body_bytes: int):
        self.app, self.max_body_bytes = app, max_body_bytes

    def _reject(self, size: str):
        return JSONResponse(status_code=413, content={"detail": f"request body of {size} bytes is over this "
                            f"server's limit of {self.max_body_bytes} bytes; send fewer/smaller data per request "
                            "or start the server with a larger max_body_bytes"})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return await self._reject(declared.decode())(scope, receive, send)
        received = 0
        started = False

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise BodyTooLarge()
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._reject(f"more than {self.max_body_bytes}")(scope, receive, send)


class HTTPProblem(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


async def _json(request: Request) -> dict:
    try:
        body = json.loads(await request.body() or b"{}")
    except ValueError as error:
        raise HTTPProblem(400, f"{request.url.path}: body is not valid JSON ({error})") from error
    if not isinstance(body, dict):
        raise HTTPProblem(400, f"{request.url.path}: body must be a JSON object")
    return body


def _field(body: dict, name: str, path: str):
    if body.get(name) is None:
        raise HTTPProblem(400, f"{path}: missing field {name!r}")
    return body[name]


def _future(request_id: str, model_id: str | None = None) -> dict:
    out = {"request_id": request_id}
    if model_id is not None:
        out["model_id"] = model_id
    return out


def create_app(service: TinkerService, *, api_key: str | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    app = FastAPI(title="jaxrl_vl tinker server")
    app.state.service = service
    app.add_middleware(BodySizeLimit, max_body_bytes=max_body_bytes)

    @app.middleware("http")
    async def check_api_key(request: Request, call_next):
        if api_key and request.url.path != "/api/v1/healthz":
            given = request.headers.get("x-api-key") or request.headers.get("authorization", "").removeprefix(
                "Bearer ").strip()
            # bytes: compare_digest refuses non-ASCII str (a 500 before); constant time either way
            if not given or not hmac.compare_digest(given.encode("utf-8", "surrogateescape"),
                                                    api_key.encode("utf-8")):
                what = "no API key" if not given else "a wrong API key"
                return JSONResponse(status_code=401, content={"detail": f"request carries {what}; set "
                                    "TINKER_API_KEY (header X-API-Key) to the key this server was started with"})
        return await call_next(request)

    @app.exception_handler(HTTPProblem)
    async def problem(_: Request, error: HTTPProblem):
        return JSONResponse(status_code=error.status, content={"detail": error.message})

    @app.exception_handler(NotFoundError)
    async def missing(_: Request, error: NotFoundError):
        return JSONResponse(status_code=404, content={"detail": str(error)})

    @app.exception_handler(UserError)
    async def user_error(_: Request, error: UserError):
        return JSONResponse(status_code=400, content={"detail": str(error)})

    # Route handlers only parse and validate request bodies (the real work runs in futures), so a
    # ValueError/TypeError/AttributeError escaping them means a field of the wrong type or shape, e.g.
    # int("abc") or "reason": "x" where an object is expected: the client's fault, not a 500. Logged with
    # the traceback so a genuine server bug stays visible.
    @app.exception_handler(ValueError)
    @app.exception_handler(TypeError)
    @app.exception_handler(AttributeError)
    async def wrong_type(request: Request, error: Exception):
        log.warning("400 for %s: %s: %s", request.url.path, type(error).__name__, error, exc_info=error)
        return JSONResponse(status_code=400, content={
            "detail": f"{request.url.path}: a request field has the wrong type or value "
                      f"({type(error).__name__}: {error}); see the tinker==0.38.0 request types"})

    @app.exception_handler(KeyError)
    async def not_found(_: Request, error: KeyError):
        return JSONResponse(status_code=404, content={"detail": f"unknown id {error.args[0]!r}"})

    # ---- client bootstrap, sessions, telemetry ---------------------------------------------------
    @app.post("/api/v1/client/config")
    async def client_config():
        return CLIENT_CONFIG

    @app.get("/api/v1/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/api/v1/get_server_capabilities")
    async def capabilities():
        return {"supported_models": [{"model_name": service.backend.model_name, "trainable": True,
                                      "sampleable": service.sampler is not None,
                                      "max_context_length": service.max_context_length}]}

    @app.post("/api/v1/create_session")
    async def create_session(request: Request):
        body = await _json(request)
        session = service.sessions.create(body.get("tags"), body.get("user_metadata"))
        return {"type": "create_session", "session_id": session.session_id}

    @app.post("/api/v1/session_heartbeat")
    async def heartbeat(request: Request):
        service.sessions.heartbeat((await _json(request)).get("session_id"))
        return {"type": "session_heartbeat"}

    @app.post("/api/v1/sessions/{session_id}/finish")
    async def finish(session_id: str, request: Request):
        reason = ((await _json(request)).get("reason") or {}).get("type", "success")
        service.sessions.finish(session_id, reason)
        return {"status": "ok"}

    @app.post("/api/v1/telemetry")
    async def telemetry():
        return {"status": "accepted"}

    # ---- training --------------------------------------------------------------------------------
    @app.post("/api/v1/create_model")
    async def create_model(request: Request):
        body = await _json(request)
        _field(body, "session_id", "create_model")
        request_id, model_id = service.submit_create_model(body)
        return _future(request_id, model_id)

    @app.post("/api/v1/get_info")
    async def get_info(request: Request):
        model_id = _field(await _json(request), "model_id", "get_info")
        await service.wait_created(model_id)
        return service.get_info(model_id)

    @app.post("/api/v1/forward_backward")
    async def forward_backward(request: Request):
        call = parse_forward_backward(await request.body(), request.headers.get("content-encoding"))
        service.known_model(call.model_id)
        return _future(service.submit_forward_backward(call), call.model_id)

    @app.post("/api/v1/optim_step")
    async def optim_step(request: Request):
        body = await _json(request)
        service.known_model(_field(body, "model_id", "optim_step"))
        return _future(service.submit_optim_step(body), body["model_id"])

    @app.post("/api/v1/save_weights")
    async def save_weights(request: Request):
        body = await _json(request)
        service.known_model(_field(body, "model_id", "save_weights"))
        return _future(service.submit_save_weights(body), body["model_id"])

    @app.post("/api/v1/save_weights_for_sampler")
    async def save_weights_for_sampler(request: Request):
        body = await _json(request)
        service.known_model(_field(body, "model_id", "save_weights_for_sampler"))
        await service.wait_created(body["model_id"])
        return _future(service.submit_save_weights_for_sampler(body), body["model_id"])

    @app.post("/api/v1/load_weights")
    async def load_weights(request: Request):
        body = await _json(request)
        _field(body, "path", "load_weights")
        if body.get("model_id"):
            service.known_model(body["model_id"])
            await service.wait_created(body["model_id"])
        request_id, model_id = service.submit_load_weights(body)
        return _future(request_id, model_id)

    @app.get("/api/v1/training_runs/{model_id}")
    async def training_run(model_id: str):
        service.known_model(model_id)
        await service.wait_created(model_id)
        return service.training_run(model_id)

    @app.get("/api/v1/training_runs")
    async def training_runs(limit: int = 20, offset: int = 0):
        ids = sorted(service.backend.models)
        runs = [service.training_run(m) for m in ids[offset:offset + limit]]
        return {"training_runs": runs, "cursor": {"offset": offset, "limit": limit, "total_count": len(ids)}}

    @app.get("/api/v1/training_runs/{model_id}/checkpoints")
    async def list_checkpoints(model_id: str):
        return {"checkpoints": service.store.list(model_id), "cursor": None}

    @app.delete("/api/v1/training_runs/{model_id}/checkpoints/{checkpoint_id:path}")
    async def delete_checkpoint(model_id: str, checkpoint_id: str):
        service.store.delete(parse_tinker_path(f"tinker://{model_id}/{checkpoint_id}"))
        return {"status": "deleted"}

    # ---- sampling --------------------------------------------------------------------------------
    @app.post("/api/v1/create_sampling_session")
    async def create_sampling_session(request: Request):
        body = await _json(request)
        _field(body, "session_id", "create_sampling_session")
        return service.create_sampling_session(body)

    @app.get("/api/v1/samplers/{sampler_id:path}")
    async def get_sampler(sampler_id: str):
        sampling = service.sessions.get_sampling(sampler_id)
        return {"sampler_id": sampler_id, "base_model": sampling.base_model, "model_path": sampling.model_path}

    @app.post("/api/v1/asample")
    async def asample(request: Request):
        body = await _json(request)
        _field(body, "prompt", "asample")
        request_id, sequence_ids = service.submit_sample(body)
        return {"request_id": request_id, "sample_sequence_ids": sequence_ids}

    # ---- futures ---------------------------------------------------------------------------------
    @app.post("/api/v1/retrieve_future")
    async def retrieve_future(request: Request):
        request_id = str(_field(await _json(request), "request_id", "retrieve_future"))
        if not service.futures.exists(request_id):
            raise HTTPProblem(404, f"unknown request_id {request_id!r} (never issued by this server, or expired)")
        result = await service.retrieve(request_id)
        if result is None:
            return {"type": "try_again", "request_id": request_id, "queue_state": "active"}
        if isinstance(result, Failure):
            return result.to_json()
        if isinstance(result, bytes):
            return Response(content=result, media_type=PROTOBUF)
        return result

    return app
