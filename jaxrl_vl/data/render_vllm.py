"""VLLMRenderer: render chats with a running vLLM server (`/v1/chat/completions/render`), the
source of truth for tokens and pixels. Gives the same RenderedExample as HFRenderer (uint8 pixels
from `mm_decode`, the same assistant/image spans), so the two are interchangeable.

Images are decoded locally first and sent as PNG data URIs: the server then sees exactly the
pixels the local path sees (a JPEG re-decoded by another libjpeg could differ by a few levels).
The async client lives on a private event-loop thread so `render` can be called synchronously
(the Renderer protocol); `render_many` renders several chats concurrently.
"""

from __future__ import annotations

import asyncio
import threading

import numpy as np

from jaxrl_vl.data import images as images_lib
from jaxrl_vl.data.render import (RenderedExample, make_rendered_example, processor_chat_template,
                                  set_vocab_facts)


def _with_decoded_images(messages):
    """Image items -> `{"type": "image", "image": <RGB PIL image>}` (decoded here, once)."""
    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            content = [{"type": "image", "image": images_lib.load_image(images_lib.image_ref(part))}
                       if images_lib.is_image_item(part) else part for part in content]
            message = {**message, "content": content}
        out.append(message)
    return out


class VLLMRenderer:
    """Renderer backed by a vLLM server at `base_url` serving `model_name`.

    Token ids (image token, pad, the assistant header) and the image mean/std come from the
    checkpoint folder the server serves (`model_dir`): small local files, no weights are read.
    """

    def __init__(self, base_url: str, model_name: str, model_dir: str, *, max_concurrency: int = 8,
                 timeout_seconds: float = 120.0):
        from transformers import AutoImageProcessor, AutoTokenizer

        from jaxrl_vl.rollout.client import VLLMClient

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        template = processor_chat_template(model_dir)
        if template is not None:
            tokenizer.chat_template = template
        image_processor = AutoImageProcessor.from_pretrained(model_dir)
        set_vocab_facts(self, tokenizer, image_processor)  # tokenizer for decoding only; tokens come from the server
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vllm-renderer-loop", daemon=True)
        self._thread.start()
        self._client = self._run(self._make_client(VLLMClient, base_url, model_name, max_concurrency, timeout_seconds))

    @staticmethod
    async def _make_client(client_cls, base_url, model_name, max_concurrency, timeout_seconds):
        return client_cls(base_url, model_name, max_concurrency=max_concurrency, timeout_seconds=timeout_seconds)

    def _run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    async def render_async(self, messages: list[dict], tools: list[dict] | None = None) -> RenderedExample:
        from jaxrl_vl.rollout.messages import to_openai_messages
        from jaxrl_vl.rollout.mm_decode import decode_images

        openai_messages = to_openai_messages(_with_decoded_images(messages))
        response = await self._client.render(openai_messages, tools=tools, add_generation_prompt=False)
        pixels, grid = decode_images(response.get("features"), merge_size=self.merge_size)
        if pixels.shape[0] == 0:
            pixels = np.zeros((0, self.patch_dim), np.uint8)
        return make_rendered_example(response["token_ids"], pixels, grid, image_token_id=self.image_token_id,
                                     header_ids=self.header_ids, end_id=self.end_id, merge_size=self.merge_size,
                                     patch_dim=self.patch_dim)

    def render(self, messages: list[dict], tools: list[dict] | None = None) -> RenderedExample:
        return self._run(self.render_async(messages, tools))

    def render_many(self, chats: list[tuple[list[dict], list[dict] | None]]) -> list[RenderedExample]:
        """[(messages, tools)] -> examples, rendered concurrently (bounded by max_concurrency)."""
        async def all_of():
            return await asyncio.gather(*(self.render_async(m, t) for m, t in chats))

        return self._run(all_of())

    def close(self) -> None:
        """Close the HTTP client and stop the loop thread."""
        if self._loop.is_running():
            self._run(self._client.aclose())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
