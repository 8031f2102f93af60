"""Greedy generation through vLLM for evaluation: push the trainer's weights, render, sample.

The server is started in a background thread when the generator is created (a CPU vLLM server
takes a minute or more to boot, which then overlaps with training), or attached by URL. Each
`generate` call pushes the params as weight version `version` (the training step), renders every
prompt's messages through the server's chat template and image processor, and samples greedily.
"""
from __future__ import annotations

import asyncio
import logging
import threading

from jaxrl_vl.rollout import server as server_lib
from jaxrl_vl.rollout.client import VLLMClient
from jaxrl_vl.rollout.messages import to_openai_messages
from jaxrl_vl.rollout.weight_push import check_weight_versions, push_params

log = logging.getLogger(__name__)


class ServerStartError(RuntimeError):
    """The eval server could not be started (or attached)."""


def vllm_available() -> bool:
    """True when this checkout has the CPU vLLM environment (make install-vllm)."""
    return (server_lib.DEFAULT_VLLM_VENV / "bin" / server_lib.LAUNCHER_NAME).exists()


class VLLMGenerator:
    name = "vllm"

    def __init__(self, model_dir: str, model_config, tokenizer, *, url: str = "", max_concurrency: int = 8,
                 max_model_len: int = 1024, log_dir: str | None = None):
        self.model_config, self.tokenizer, self.max_concurrency = model_config, tokenizer, max_concurrency
        self._handle = None
        self._error: BaseException | None = None
        self._thread = None
        if url:
            try:
                self._handle = server_lib.attach_server(url)
            except Exception as err:  # reported on first use, like a failed start
                self._error = err
            return
        config = server_lib.ServerConfig(model=model_dir, max_model_len=max_model_len, max_num_seqs=max_concurrency,
                                         log_dir=log_dir)
        self._thread = threading.Thread(target=self._start, args=(config,), daemon=True, name="vllm-start")
        self._thread.start()

    def _start(self, config) -> None:
        try:
            self._handle = server_lib.start_server(config)
        except BaseException as err:  # reported on first use
            self._error = err

    def _server(self):
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise ServerStartError(f"the vLLM eval server did not start: {self._error}") from self._error
        return self._handle

    def generate(self, params, prompts, max_new_tokens: int, version: int = 0) -> list[str]:
        handle = self._server()
        return asyncio.run(self._generate(handle, params, prompts, max_new_tokens, version))

    async def _generate(self, handle, params, prompts, max_new_tokens, version) -> list[str]:
        async with VLLMClient(handle.url, handle.served_model_name, max_concurrency=self.max_concurrency) as client:
            await push_params(params, self.model_config, [client], version)
            sampling = {"temperature": 0.0, "max_tokens": max_new_tokens}

            async def one(prompt):
                if not prompt.messages:
                    raise ValueError(f"record {prompt.id}: no messages to render for vLLM generation")
                rendered = await client.render(to_openai_messages(list(prompt.messages)))
                choice = (await client.generate(rendered, sampling))["choices"][0]
                if not check_weight_versions(choice, version):
                    raise RuntimeError(f"record {prompt.id}: sampled with weights {choice.get('weight_versions')}, "
                                       f"expected version {version}")
                return self.tokenizer.decode(choice["token_ids"], skip_special_tokens=True)

            return list(await asyncio.gather(*(one(p) for p in prompts)))

    def close(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._handle is not None:
            server_lib.stop_server(self._handle)
            self._handle = None
