"""ASGI middleware for `vllm serve --middleware vllm_token_auth.RequireBearerToken`: every route but
/health needs `Authorization: Bearer <JAXRL_VL_SERVER_TOKEN>`.

Why: vLLM's own `--api-key` guards only /v1, /v2, /inference and /cohere. The dev-mode routes a
trainer needs (`/pause`, `/resume`, `/collective_rpc`, `/update_weights`, `/init_weight_transfer_engine`,
`/update_weight_version`, `/reset_prefix_cache`, ...) stay open, and `/collective_rpc` calls worker
methods by name. This closes all of them. Standalone on purpose (standard library only): it is
imported inside vLLM's own virtualenv, where jaxrl_vl is not installed; launch/vllm_gpu_server.sh
puts this folder on PYTHONPATH.
"""
import hashlib
import hmac
import os

TOKEN_ENV = "JAXRL_VL_SERVER_TOKEN"
MIN_TOKEN_CHARS = 32
OPEN_PATHS = ("/health",)  # load balancers and the trainer's readiness probe


def _token_digest(environ=os.environ) -> bytes:
    token = environ.get(TOKEN_ENV, "")
    if len(token) < MIN_TOKEN_CHARS:
        raise RuntimeError(f"{TOKEN_ENV} must hold a secret of at least {MIN_TOKEN_CHARS} characters "
                           f"(e.g. `export {TOKEN_ENV}=$(openssl rand -hex 32)`); got {len(token)}")
    return hashlib.sha256(token.encode()).digest()


class RequireBearerToken:
    """Pure ASGI middleware; vLLM instantiates it as `app.add_middleware(RequireBearerToken)`."""

    def __init__(self, app, environ=None):
        self.app = app
        self._digest = _token_digest(os.environ if environ is None else environ)

    def _authorized(self, scope) -> bool:
        for name, value in scope.get("headers", []):
            if name.lower() == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                if scheme.lower() == "bearer":
                    return hmac.compare_digest(hashlib.sha256(token.encode()).digest(), self._digest)
        return False

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket") or scope.get("method") == "OPTIONS":
            return await self.app(scope, receive, send)
        path = scope["path"].removeprefix(scope.get("root_path", "") or "")
        if path in OPEN_PATHS or self._authorized(scope):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        body = b'{"error":"Unauthorized: send Authorization: Bearer <token>"}'
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
