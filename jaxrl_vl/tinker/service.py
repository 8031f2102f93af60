"""The Tinker service: glues sessions, futures, the JAX training backend, checkpoints and the vLLM sampler.

Each public `submit_*` method validates what it can cheaply, schedules the work as a future and returns
the request id. Training work runs on ONE worker thread (JAX), in seq_id order per model; sampling runs
on the event loop (it only awaits vLLM).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
from collections.abc import Callable
from typing import Any

from jaxrl_vl.tinker.backend import TrainingBackend
from jaxrl_vl.tinker.futures import Failure, FutureStore
from jaxrl_vl.tinker.protocol import ForwardBackwardCall, UserError, chunks_from_json, encode_forward_backward_output, \
    encode_sample_response
from jaxrl_vl.tinker.sampling import VLLMSampler
from jaxrl_vl.tinker.sessions import SamplingSession, Sessions, model_id_for, sampling_session_id_for
from jaxrl_vl.tinker.storage import CheckpointStore, parse_tinker_path

log = logging.getLogger("jaxrl_vl.tinker")


class TinkerService:
    def __init__(self, backend: TrainingBackend, store: CheckpointStore, sampler: VLLMSampler | None, *,
                 futures: FutureStore | None = None, max_context_length: int | None = None):
        self.backend = backend
        self.store = store
        self.sampler = sampler
        self.futures = futures or FutureStore()
        self.sessions = Sessions()
        self.max_context_length = max_context_length
        self._creating: dict[str, str] = {}  # model id -> request id of its create/load-create
        self._worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="tinker-jax")

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)

    # ---- helpers ---------------------------------------------------------------------------------
    async def _on_worker(self, fn: Callable, *args, **kwargs) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._worker, lambda: fn(*args, **kwargs))

    def check_base_model(self, base_model: str | None) -> str:
        """The client's base_model must name this server's model (its id, path or folder name)."""
        ours = self.backend.model_name
        if base_model is None or base_model == ours:
            return ours
        same_path = os.path.exists(base_model) and os.path.realpath(base_model) == os.path.realpath(
            self.backend.model_dir)
        if same_path or os.path.basename(base_model.rstrip("/")) == os.path.basename(ours.rstrip("/")):
            return ours
        raise UserError(f"base_model {base_model!r} is not served here; this server runs {ours!r} "
                        "(pass it as model_name / base_model)")

    def known_model(self, model_id: str) -> None:
        """KeyError (HTTP 404) unless the model exists or its creation was submitted."""
        if model_id not in self.backend.models and model_id not in self._creating:
            raise KeyError(model_id)

    async def wait_created(self, model_id: str) -> None:
        """Waits for a submitted create_model / create-via-load of model_id to finish."""
        request_id = self._creating.get(model_id)
        if model_id in self.backend.models or request_id is None:
            return
        result = await self.futures.wait(request_id, timeout_seconds=600.0)
        if isinstance(result, Failure):
            raise UserError(f"model {model_id} could not be created: {result.message}")

    def _ordered(self, model_id: str, seq_id: int | None, work: Callable[[], Any]) -> str:
        """Training work for model_id, run on the JAX thread in seq_id order, deduplicated on retries."""
        async def run():
            return await self._on_worker(work)
        return self.futures.submit(run, key=model_id, seq_id=seq_id, ordered=True)

    # ---- models ----------------------------------------------------------------------------------
    def submit_create_model(self, body: dict) -> tuple[str, str]:
        session_id = body.get("session_id")
        self.sessions.get(session_id)
        model_id = model_id_for(session_id, int(body.get("model_seq_id", 0)))
        base = self.check_base_model(body.get("base_model"))
        optimizer = (body.get("optimizer_config") or {}).get("type", "adamw")
        if optimizer != "adamw":
            raise UserError(f"optimizer_config.type={optimizer!r}: only 'adamw' is supported")
        del base

        def work():
            if model_id not in self.backend.models:  # a retried create keeps the first model
                self.backend.create_model(model_id, session_id, body.get("lora_config"),
                                          user_metadata=body.get("user_metadata"))
            return {"model_id": model_id, "type": "create_model"}
        request_id = self._ordered(model_id, None, work)
        self._creating.setdefault(model_id, request_id)
        return request_id, model_id

    def get_info(self, model_id: str) -> dict:
        model = self.backend.get(model_id)
        return {"type": "get_info", "model_id": model_id, "is_lora": True, "lora_rank": model.lora_cfg.rank,
                "model_name": self.backend.model_name, "optimizer_config": {"type": "adamw"},
                "model_data": {"arch": self.backend.config.arch, "model_name": self.backend.model_name,
                               "tokenizer_id": self.backend.model_dir}}

    def submit_forward_backward(self, call: ForwardBackwardCall) -> str:
        def work():
            outputs, metrics = self.backend.forward_backward(call)
            return encode_forward_backward_output(outputs, metrics)
        return self._ordered(call.model_id, call.seq_id, work)

    def submit_optim_step(self, body: dict) -> str:
        model_id = body["model_id"]
        params = body.get("adam_params") or body.get("optim_params") or body.get("optimizer_params") or {}
        return self._ordered(model_id, body.get("seq_id"),
                             lambda: {"metrics": self.backend.optim_step(model_id, params)})

    # ---- checkpoints -----------------------------------------------------------------------------
    def submit_save_weights(self, body: dict) -> str:
        model_id = body["model_id"]
        name = body.get("path") or f"step-{body.get('seq_id', 0):06d}"

        def work():
            cp = parse_tinker_path(f"tinker://{model_id}/weights/{name}")
            return {"path": self.backend.save_state(model_id, cp.name, ttl_seconds=body.get("ttl_seconds"),
                                                    user_metadata=body.get("user_metadata")),
                    "type": "save_weights"}
        return self._ordered(model_id, body.get("seq_id"), work)

    def submit_save_weights_for_sampler(self, body: dict) -> str:
        model_id = body["model_id"]
        model = self.backend.get(model_id)
        sampling_seq = body.get("sampling_session_seq_id")
        name = body.get("path")
        if name is None and sampling_seq is None:
            raise UserError("save_weights_for_sampler: give `path` (a name) or `sampling_session_seq_id`")
        if name is None:
            name = f"ephemeral-{int(sampling_seq)}"

        def work():
            cp = parse_tinker_path(f"tinker://{model_id}/sampler_weights/{name}")
            folder = self.backend.export_sampler(model_id, cp, ttl_seconds=body.get("ttl_seconds"),
                                                 user_metadata=body.get("user_metadata"))
            if sampling_seq is None:
                return {"path": cp.tinker_path, "type": "save_weights_for_sampler"}
            sid = sampling_session_id_for(model.session_id, int(sampling_seq))
            self.sessions.add_sampling(SamplingSession(sid, self.backend.model_name, cp.tinker_path, folder))
            return {"path": None, "sampling_session_id": sid, "type": "save_weights_for_sampler"}
        return self._ordered(model_id, body.get("seq_id"), work)

    def submit_load_weights(self, body: dict) -> tuple[str, str]:
        cp = parse_tinker_path(body.get("path"))
        with_optimizer = bool(body.get("optimizer", False))
        if body.get("model_id"):
            model_id = body["model_id"]
            self.backend.get(model_id)
            return self._ordered(model_id, body.get("seq_id"), lambda: (
                self.backend.load_state(model_id, cp, with_optimizer=with_optimizer),
                {"path": cp.tinker_path, "model_id": model_id, "type": "load_weights"})[1]), model_id
        session_id = body.get("session_id")
        self.sessions.get(session_id)
        self.check_base_model(body.get("base_model"))
        model_id = model_id_for(session_id, int(body.get("model_seq_id", 0)))

        def create():
            if model_id not in self.backend.models:
                self.backend.create_from_state(model_id, session_id, cp, with_optimizer=with_optimizer,
                                               user_metadata=body.get("user_metadata"))
            return {"path": cp.tinker_path, "model_id": model_id, "type": "load_weights"}
        request_id = self._ordered(model_id, None, create)
        self._creating.setdefault(model_id, request_id)
        return request_id, model_id

    def training_run(self, model_id: str) -> dict:
        model = self.backend.get(model_id)
        metadata = {str(k): str(v) for k, v in (model.user_metadata or {}).items()} or None
        return {"training_run_id": model_id, "base_model": model.base_model, "model_owner": "local",
                "is_lora": True, "lora_rank": model.lora_cfg.rank, "corrupted": False,
                "last_request_time": model.last_request_time, "user_metadata": metadata,
                "last_checkpoint": model.last_checkpoint, "last_sampler_checkpoint": model.last_sampler_checkpoint}

    # ---- sampling --------------------------------------------------------------------------------
    def create_sampling_session(self, body: dict) -> dict:
        session_id = body.get("session_id")
        self.sessions.get(session_id)
        sid = sampling_session_id_for(session_id, int(body.get("sampling_session_seq_id", 0)))
        self.sessions.add_sampling(self._sampling_target(sid, body.get("model_path"), body.get("base_model")))
        return {"type": "create_sampling_session", "sampling_session_id": sid}

    def _sampling_target(self, sid: str, model_path: str | None, base_model: str | None) -> SamplingSession:
        if model_path:
            cp = parse_tinker_path(model_path)
            return SamplingSession(sid, self.backend.model_name, cp.tinker_path, self.store.sampler_dir(cp))
        return SamplingSession(sid, self.check_base_model(base_model), None, None)

    def submit_sample(self, body: dict) -> tuple[str, list[str]]:
        """Sampling goes to vLLM; prompt logprobs (compute_logprobs) come from the JAX model on the worker."""
        sid = body.get("sampling_session_id")
        target = (self.sessions.get_sampling(sid) if sid else
                  self._sampling_target("direct", body.get("model_path"), body.get("base_model")))
        if self.sampler is None:
            raise UserError("this server runs without a sampler (started with --no-vllm)")
        chunks = chunks_from_json(body.get("prompt"))
        num_samples = int(body.get("num_samples", 1))
        image_token_id = self.backend.config.image_token_id

        async def work():
            prompt_lps = None
            if body.get("prompt_logprobs"):
                prompt_lps = await self._on_worker(self.backend.prompt_logprobs, chunks, target.adapter_folder)
            sequences, _ = await self.sampler.sample(
                chunks, image_token_id=image_token_id, num_samples=num_samples,
                sampling_params=body.get("sampling_params") or {}, prompt_logprobs=False,
                adapter_folder=target.adapter_folder)
            return encode_sample_response(sequences, prompt_lps)
        key = sid if sid is not None and body.get("seq_id") is not None else None
        request_id = self.futures.submit(work, key=key, seq_id=body.get("seq_id"))
        return request_id, [f"seq-{request_id}-{i}" for i in range(num_samples)]

    async def retrieve(self, request_id: str, timeout_seconds: float | None = None) -> Any:
        """dict | bytes | Failure | None (still running: answer try_again)."""
        return await self.futures.wait(request_id, timeout_seconds)

    def failed_future(self, message: str, *, key: str | None = None, seq_id: int | None = None) -> str:
        return self.futures.fail_now(Failure(message, "user"), key=key, seq_id=seq_id)
