"""Async client for a vLLM server used as render + rollout engine (vLLM 0.32 routes).

- `render(messages, tools=...)`  POST /v1/chat/completions/render: token ids with image
  placeholders expanded, plus `features` (image hashes, placeholder offsets, pixel data).
- `generate(rendered, sampling_params)`  POST /inference/v1/generate: token-in/token-out sampling
  with seeds, stop ids, logprobs, prompt logprobs, n; the response names the weight version(s).
- `derender(...)`  POST /v1/chat/completions/derender: generate output -> ChatCompletion.

Concurrency is bounded by a semaphore; connection errors and 502/503/504 are retried with
exponential backoff; other errors raise `VLLMError` quoting the server's answer; a prompt longer
than the server's context raises `ContextLengthError` naming both lengths.
"""
import asyncio
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx

RETRY_STATUS_CODES = (502, 503, 504)
_CONTEXT_PATTERNS = (
    re.compile(r"prompt \(length (?P<prompt>\d+)\) is longer than the maximum model length of (?P<max>\d+)"),
    re.compile(r"maximum context length is (?P<max>\d+) tokens.*?contains at least (?P<prompt>\d+) input tokens", re.S),
)


class VLLMError(RuntimeError):
    """The server answered with an error (or never answered). Carries what it said."""

    def __init__(self, message: str, *, url: str, status_code: int | None = None, body: str | None = None):
        super().__init__(message)
        self.url, self.status_code, self.body = url, status_code, body


class ContextLengthError(VLLMError):
    """The prompt (plus images) does not fit the server's `max_model_len`."""

    def __init__(self, *, url: str, prompt_tokens: int, max_model_len: int, body: str | None = None):
        super().__init__(f"prompt of {prompt_tokens} tokens (text + image placeholders) does not fit the "
                         f"server's context of {max_model_len} tokens (--max-model-len) at {url}; "
                         "shorten the conversation or start the server with a larger max_model_len",
                         url=url, status_code=400, body=body)
        self.prompt_tokens, self.max_model_len = prompt_tokens, max_model_len


def _error_message(response: httpx.Response) -> str:
    try:
        payload = response.json()
    except ValueError:
        return response.text[:2000]
    error = payload.get("error", payload) if isinstance(payload, dict) else payload
    if isinstance(error, dict):
        return str(error.get("message") or error.get("detail") or error)
    return str(error)[:2000]


class VLLMClient:
    """One server's client. Use `async with VLLMClient(url, model) as client: ...`."""

    def __init__(self, base_url: str, model: str, *, max_concurrency: int = 16, timeout_seconds: float = 600.0,
                 max_retries: int = 4, backoff_seconds: float = 0.5, max_model_len: int | None = None,
                 api_key: str | None = None):
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency={max_concurrency}: must be >= 1")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.max_retries = max_retries
        self.backoff_seconds = backoff_seconds
        self.max_model_len = max_model_len
        self._semaphore = asyncio.Semaphore(max_concurrency)
        limits = httpx.Limits(max_connections=max_concurrency + 4, max_keepalive_connections=max_concurrency)
        # api_key: sent as `Authorization: Bearer` on every request (a server behind
        # launch/vllm_gpu_server.sh requires it on all routes but /health).
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        self._http = httpx.AsyncClient(base_url=self.base_url, timeout=timeout_seconds, limits=limits, headers=headers)

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def request(self, method: str, path: str, json: Any = None, params: dict | None = None, *,
                      content: Callable[[], AsyncIterator[bytes]] | None = None,
                      headers: dict[str, str] | None = None) -> Any:
        """One HTTP call with bounded concurrency and retries. Returns decoded JSON (the text for a
        non-JSON body, None for an empty one). Raises VLLMError / ContextLengthError. `content`: a raw
        body, as a function returning a fresh async iterator of bytes for each attempt."""
        url = f"{self.base_url}{path}"
        last_error: Exception | None = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                await asyncio.sleep(self.backoff_seconds * 2 ** (attempt - 1))
            try:
                async with self._semaphore:
                    response = await self._http.request(method, path, json=json, params=params, headers=headers,
                                                        content=None if content is None else content())
            except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError) as error:
                last_error = error  # server restarting or briefly overloaded: retry
                continue
            except httpx.TimeoutException as error:
                raise VLLMError(f"{method} {url} timed out ({type(error).__name__}); the server may be hung",
                                url=url) from error
            if response.status_code in RETRY_STATUS_CODES:
                last_error = VLLMError(f"{method} {url} -> {response.status_code}: {_error_message(response)}",
                                       url=url, status_code=response.status_code, body=response.text)
                continue
            if response.status_code >= 400:
                raise self._http_error(method, url, response)
            if not response.content:
                return None
            try:
                return response.json()
            except ValueError:
                return response.text  # e.g. /v1/load_lora_adapter answers plain text
        raise VLLMError(f"{method} {url} failed after {self.max_retries + 1} attempts: "
                        f"{type(last_error).__name__}: {last_error}", url=url,
                        status_code=getattr(last_error, "status_code", None)) from last_error

    def _http_error(self, method: str, url: str, response: httpx.Response) -> VLLMError:
        message = _error_message(response)
        if response.status_code == 400:
            for pattern in _CONTEXT_PATTERNS:
                match = pattern.search(message)
                if match:
                    return ContextLengthError(url=url, prompt_tokens=int(match["prompt"]),
                                              max_model_len=int(match["max"]), body=response.text)
        hint = ""
        if response.status_code == 401:
            hint = " (the server requires a bearer token: VLLMClient(api_key=...), config vllm.token_env)"
        elif response.status_code == 403:
            hint = " (token-in/token-out routes need `--enable-scale-out`)"
        elif response.status_code == 404 and any(p in url for p in ("/pause", "/resume", "/collective_rpc")):
            hint = " (weight-update routes need VLLM_SERVER_DEV_MODE=1)"
        return VLLMError(f"{method} {url} -> {response.status_code}: {message}{hint}", url=url,
                         status_code=response.status_code, body=response.text)

    async def server_max_model_len(self) -> int:
        """The served model's max_model_len (from /v1/models), cached."""
        if self.max_model_len is None:
            models = (await self.request("GET", "/v1/models"))["data"]
            entry = next((m for m in models if m["id"] == self.model), models[0])
            self.max_model_len = int(entry["max_model_len"])
        return self.max_model_len

    def chat_request(self, messages: list[dict], *, tools: list[dict] | None = None, tool_choice: str | None = None,
                     add_generation_prompt: bool = True, chat_template_kwargs: dict | None = None,
                     model: str | None = None) -> dict:
        """The ChatCompletion body that `render` sends (and `derender` needs back to parse tools)."""
        body: dict[str, Any] = {"model": model or self.model, "messages": messages,
                                "add_generation_prompt": add_generation_prompt}
        if tools:
            body["tools"] = tools
            body["tool_choice"] = tool_choice or "auto"
        if chat_template_kwargs:
            body["chat_template_kwargs"] = chat_template_kwargs
        return body

    async def render(self, messages: list[dict], **chat_request_kwargs) -> dict:
        """OpenAI-style messages (images as `image_url` data URIs; see messages.to_openai_messages)
        -> the render response: {"token_ids": [...], "features": {...} | None, ...}, ready to pass
        to `generate`. Keyword arguments as in `chat_request` (tools, tool_choice, ...)."""
        body = self.chat_request(messages, **chat_request_kwargs)
        return await self.request("POST", "/v1/chat/completions/render", json=body)

    async def generate(self, prompt: dict | list[int], sampling_params: dict, *, model: str | None = None) -> dict:
        """Samples from a rendered prompt (a render response, or {"token_ids", "features"}) or
        from bare token ids. `sampling_params` uses vLLM names: temperature, top_p, top_k, seed,
        max_tokens, n, logprobs, prompt_logprobs, stop_token_ids, ... Returns the raw response:
        {"choices": [{"token_ids", "logprobs": {"content": [...]}, "finish_reason",
        "weight_versions"}], "prompt_logprobs": ..., ...}."""
        if isinstance(prompt, dict):
            token_ids, features = prompt["token_ids"], prompt.get("features")
        else:
            token_ids, features = list(prompt), None
        if not token_ids:
            raise ValueError("generate: the prompt has no token ids")
        if self.max_model_len is not None and len(token_ids) >= self.max_model_len:
            raise ContextLengthError(url=f"{self.base_url}/inference/v1/generate",
                                     prompt_tokens=len(token_ids), max_model_len=self.max_model_len)
        body = {"model": model or self.model, "token_ids": token_ids, "sampling_params": dict(sampling_params)}
        if features:
            body["features"] = features
        return await self.request("POST", "/inference/v1/generate", json=body)

    async def derender(self, generate_response: dict, *, prompt_token_ids: list[int] | None = None,
                       chat_request: dict | None = None, model: str | None = None) -> dict:
        """A generate response -> an OpenAI ChatCompletion. `chat_request` is the body render got
        (`self.chat_request(...)`); servers started with a tool-call parser require it."""
        body: dict[str, Any] = {"model": model or self.model, "generate_response": generate_response}
        if prompt_token_ids is not None:
            body["prompt_token_ids"] = list(prompt_token_ids)[-8:]  # only the tail seeds detokenization
            body["prompt_tokens"] = len(prompt_token_ids)
        if chat_request is not None:
            body["chat_request"] = chat_request
        return await self.request("POST", "/v1/chat/completions/derender", json=body)

    async def health(self) -> bool:
        try:
            response = await self._http.get("/health", timeout=10.0)
        except httpx.HTTPError:
            return False
        return response.status_code == 200


def sampled_logprobs(choice: dict) -> list[float]:
    """Logprob of each sampled token of a generate choice (requires logprobs >= 0 in the request)."""
    content = (choice.get("logprobs") or {}).get("content")
    if content is None:
        raise ValueError("generate choice has no logprobs: pass sampling_params logprobs=0 or more")
    if [c["token_id"] for c in content] != choice["token_ids"]:
        raise ValueError("generate choice: logprob entries do not match the sampled token ids")
    return [float(c["logprob"]) for c in content]


def weight_versions(choice: dict) -> list[str]:
    """The weight versions that produced a choice's tokens (several if a push landed mid-sample)."""
    return [span["version"] for span in choice.get("weight_versions") or []]
