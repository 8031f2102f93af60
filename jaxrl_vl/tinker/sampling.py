"""Sampling through vLLM for Tinker `asample` requests (base model or saved sampler weights).

- Saved sampler weights are PEFT adapters (backend.export_sampler), one NEW folder per version;
  each folder is loaded once into vLLM (`/v1/load_lora_adapter`) under its own name and requested
  with `"model": <adapter name>`. The base model is requested by the served name.
- vLLM 0.32 bug (../shared/notes/vllm.md): base and LoRA requests batched together give the base
  requests the adapter. `TrafficGate` lets only one kind run at a time (adapters may mix freely).
- Image chunks: each image is rendered once by vLLM (`/v1/chat/completions/render` of a one-image
  message, cached by content hash), which yields its placeholder length and the processed pixel
  item; the prompt is then our token ids with that many `<|image_pad|>` ids spliced in, and the
  item's features with the placeholder offset moved to where the image sits in our prompt.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import math
from collections import OrderedDict
from collections.abc import Awaitable, Callable

import httpx
import numpy as np

from jaxrl_vl.rollout.client import VLLMClient, VLLMError, sampled_logprobs
from jaxrl_vl.tinker.protocol import Chunk, ImageChunk, TextChunk, UserError

_ITEM_FIELDS = ("mm_hashes", "kwargs_data", "mm_metadata")
log = logging.getLogger("jaxrl_vl.tinker")


class TrafficGate:
    """Requests of one kind ("base" or "lora") run together; the other kind waits until they drain."""

    def __init__(self):
        self.kind: str | None = None
        self.active = 0
        self.changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def enter(self, kind: str):
        async with self.changed:
            await self.changed.wait_for(lambda: self.active == 0 or self.kind == kind)
            self.kind = kind
            self.active += 1
        try:
            yield
        finally:
            async with self.changed:
                self.active -= 1
                if self.active == 0:
                    self.changed.notify_all()


def vllm_sampling_params(params: dict, num_samples: int, prompt_length: int, max_model_len: int,
                         prompt_logprobs: bool) -> dict:
    """Tinker SamplingParams JSON -> vLLM sampling_params."""
    room = max_model_len - prompt_length
    if room < 1:
        raise UserError(f"prompt of {prompt_length} tokens leaves no room in the sampler's context of "
                        f"{max_model_len} tokens; shorten the prompt")
    max_tokens = params.get("max_tokens")
    max_tokens = room if max_tokens is None else int(max_tokens)
    if max_tokens < 1:
        raise UserError(f"sampling_params.max_tokens={max_tokens}: must be >= 1")
    if max_tokens > room:
        raise UserError(f"prompt ({prompt_length} tokens) + sampling_params.max_tokens={max_tokens} exceeds the "
                        f"sampler's context of {max_model_len} tokens; lower max_tokens to <= {room}")
    out = {"n": int(num_samples), "max_tokens": max_tokens, "logprobs": 0,
           "temperature": float(params.get("temperature", 1.0) if params.get("temperature") is not None else 1.0),
           "top_p": float(params.get("top_p") if params.get("top_p") is not None else 1.0),
           "top_k": int(params.get("top_k") if params.get("top_k") is not None else -1)}
    if out["top_k"] <= 0:
        out["top_k"] = 0  # vLLM: 0 = no top-k limit
    if params.get("seed") is not None:
        out["seed"] = int(params["seed"])
    stop = params.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None:
        if len(stop) == 0:
            out["ignore_eos"] = True  # Tinker: [] disables every stop, EOS included
        elif all(isinstance(s, int) for s in stop):
            out["stop_token_ids"] = [int(s) for s in stop]
        elif all(isinstance(s, str) for s in stop):
            out["stop"] = list(stop)
            out["include_stop_str_in_output"] = True
        else:
            raise UserError("sampling_params.stop: give a string, a list of strings or a list of token ids")
    if prompt_logprobs:
        out["prompt_logprobs"] = 0
    return out


def _prompt_logprobs(entries: list | None, prompt_ids: list[int]) -> np.ndarray:
    """vLLM prompt_logprobs ([None, {"id": {"logprob"}}...]) -> float32 [len(prompt)], NaN where unscored."""
    out = np.full(len(prompt_ids), np.nan, np.float32)
    for t, entry in enumerate(entries or []):
        if t == 0 or not entry or t >= len(prompt_ids):
            continue
        hit = entry.get(str(prompt_ids[t]))
        if hit is not None and hit.get("logprob") is not None and math.isfinite(hit["logprob"]):
            out[t] = hit["logprob"]
    return out


class VLLMSampler:
    """restart: an optional async callable that restarts a vLLM server we own and returns its new URL.
    With it, a request that finds the engine dead (e.g. its worker was OOM-killed) restarts the server
    once and is retried, instead of failing every later request."""

    def __init__(self, base_url: str, served_model_name: str, *, max_concurrency: int = 32,
                 max_model_len: int | None = None, restart: Callable[[], Awaitable[str]] | None = None):
        self.max_concurrency = max_concurrency
        self.client = VLLMClient(base_url, served_model_name, max_concurrency=max_concurrency,
                                 max_model_len=max_model_len)
        self.served_model_name = served_model_name
        self.restart = restart
        self.generation = 0  # bumps at every restart
        self._restart_lock = asyncio.Lock()
        self.gate = TrafficGate()
        self._adapters: dict[str, str] = {}  # adapter folder -> vLLM lora name
        self._adapter_lock = asyncio.Lock()
        self._images: OrderedDict[str, dict] = OrderedDict()
        self.max_cached_images = 1024

    async def aclose(self) -> None:
        await self.client.aclose()

    async def adapter_name(self, folder: str) -> str:
        async with self._adapter_lock:
            if folder not in self._adapters:
                name = "tinker-" + hashlib.sha1(folder.encode()).hexdigest()[:16]
                # vLLM answers this route with plain text, which VLLMClient (JSON only) cannot parse.
                async with httpx.AsyncClient(base_url=self.client.base_url, timeout=120.0) as http:
                    response = await http.post("/v1/load_lora_adapter", json={"lora_name": name,
                                                                             "lora_path": folder})
                if response.status_code != 200:
                    raise VLLMError(f"loading adapter {folder} into vLLM failed ({response.status_code}): "
                                    f"{response.text[:1000]}", url=self.client.base_url,
                                    status_code=response.status_code, body=response.text)
                self._adapters[folder] = name
            return self._adapters[folder]

    async def _image_item(self, chunk: ImageChunk, where: str) -> dict:
        """-> {"length": n, "fields": {field: value}} for one image (cached by content)."""
        digest = hashlib.sha1(chunk.data).hexdigest()
        if digest in self._images:
            self._images.move_to_end(digest)
            return self._images[digest]
        uri = f"data:image/{chunk.format or 'png'};base64," + base64.b64encode(chunk.data).decode("ascii")
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}}]}]
        try:
            rendered = await self.client.render(messages)
        except VLLMError as error:
            raise UserError(f"{where}: the sampler could not process the image: {error}") from error
        features = rendered.get("features") or {}
        placeholders = (features.get("mm_placeholders") or {}).get("image") or []
        if len(placeholders) != 1:
            raise UserError(f"{where}: the sampler rendered {len(placeholders)} images for one image chunk")
        item = {"length": int(placeholders[0]["length"]),
                "fields": {f: (features.get(f) or {}).get("image", [None])[0] for f in _ITEM_FIELDS}}
        self._images[digest] = item
        while len(self._images) > self.max_cached_images:
            self._images.popitem(last=False)
        return item

    async def build_prompt(self, chunks: list[Chunk], image_token_id: int,
                           where: str = "prompt") -> tuple[list[int], dict | None]:
        """Chunks -> (token ids with image placeholders, vLLM features or None)."""
        ids: list[int] = []
        features = {"mm_hashes": {}, "mm_placeholders": {}, "kwargs_data": {}, "mm_metadata": {}}
        for j, chunk in enumerate(chunks):
            if isinstance(chunk, TextChunk):
                ids.extend(int(t) for t in chunk.tokens)
                continue
            item = await self._image_item(chunk, f"{where}.chunks[{j}]")
            if chunk.expected_tokens is not None and int(chunk.expected_tokens) != item["length"]:
                raise UserError(f"{where}.chunks[{j}]: image expands to {item['length']} image tokens with this "
                                f"checkpoint's processor, but expected_tokens={chunk.expected_tokens}")
            features["mm_placeholders"].setdefault("image", []).append({"offset": len(ids),
                                                                        "length": item["length"]})
            for field, value in item["fields"].items():
                features[field].setdefault("image", []).append(value)
            ids.extend([int(image_token_id)] * item["length"])
        if not ids:
            raise UserError(f"{where}: the prompt is empty")
        return ids, ({k: v for k, v in features.items() if v} if features["mm_placeholders"] else None)

    async def _recover(self, generation: int) -> bool:
        """Restarts vLLM if it is down (once per failure generation). True when a retry makes sense."""
        if self.restart is None:
            return False
        async with self._restart_lock:
            if generation != self.generation:
                return True  # another request already restarted it
            if await self.client.health():
                return False  # the server is fine: the error was about this request
            log.error("vLLM sampler at %s is down; restarting it", self.client.base_url)
            url = await self.restart()
            await self.client.aclose()
            self.client = VLLMClient(url, self.served_model_name, max_concurrency=self.max_concurrency)
            self._adapters.clear()  # the new server has no adapters loaded
            self.generation += 1
            return True

    async def sample(self, chunks: list[Chunk], **kwargs) -> tuple[list[dict], np.ndarray | None]:
        """See `_sample`; retried once after restarting a dead vLLM server (when `restart` is set)."""
        generation = self.generation
        try:
            return await self._sample(chunks, **kwargs)
        except (VLLMError, httpx.HTTPError) as error:
            status = getattr(error, "status_code", None)
            if (status is not None and status < 500) or not await self._recover(generation):
                raise
        return await self._sample(chunks, **kwargs)

    async def _sample(self, chunks: list[Chunk], *, image_token_id: int, num_samples: int, sampling_params: dict,
                      prompt_logprobs: bool, adapter_folder: str | None) -> tuple[list[dict], np.ndarray | None]:
        """-> (sequences [{"tokens", "logprobs", "stop_reason"}], prompt logprobs float32 [len] | None)."""
        if num_samples < 1:
            raise UserError(f"num_samples={num_samples}: must be >= 1")
        prompt_ids, features = await self.build_prompt(chunks, image_token_id)
        max_model_len = await self.client.server_max_model_len()
        params = vllm_sampling_params(sampling_params, num_samples, len(prompt_ids), max_model_len, prompt_logprobs)
        model = await self.adapter_name(adapter_folder) if adapter_folder else self.served_model_name
        body = {"model": model, "token_ids": prompt_ids, "sampling_params": params}
        if features:
            body["features"] = features
        async with self.gate.enter("lora" if adapter_folder else "base"):
            try:
                response = await self.client.request("POST", "/inference/v1/generate", json=body)
            except VLLMError as error:
                if error.status_code == 400:
                    raise UserError(f"the sampler rejected the request: {error}") from error
                raise
        sequences = []
        for choice in response["choices"]:
            sequences.append({"tokens": [int(t) for t in choice["token_ids"]],
                              "logprobs": sampled_logprobs(choice),
                              "stop_reason": "stop" if choice.get("finish_reason") == "stop" else "length"})
        prompt_lps = _prompt_logprobs(response.get("prompt_logprobs"), prompt_ids) if prompt_logprobs else None
        return sequences, prompt_lps
