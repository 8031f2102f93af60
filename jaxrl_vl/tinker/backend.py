"""Training backend: Tinker training clients as LoRA adapters on ONE base model (JAX).

Each training client (model id `SID:train:N`) owns a LoRA tree, an AdamW state (optax, with the
hyperparameters injected per `optim_step` call, as Tinker clients change the learning rate every
step), accumulated gradients, and a step counter. The base params are shared and never updated.

forward_backward: datums -> rows (images expanded, see images.py) -> one padded batch -> per-token
target logprobs log p(target_tokens[t] | input[:t+1]) -> the Tinker loss (summed over tokens and
datums) -> gradients w.r.t. the LoRA tree, added to the model's accumulator until optim_step.

All methods are synchronous and meant to run on ONE worker thread (JAX work is serialized there).
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import os
from collections import OrderedDict

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from jaxrl_vl.losses.tinker_losses import resolve_loss_fn_config, tinker_loss
from jaxrl_vl.models import apply, load, make_batch
from jaxrl_vl.models.checkpoint import _resolve_dir
from jaxrl_vl.models.lora import LoraConfig, export_peft, import_peft, init_lora, lora_config_from_tinker, overlay
from jaxrl_vl.tinker.images import ImageExpander
from jaxrl_vl.tinker.protocol import SUPPORTED_LOSSES, Datum, ForwardBackwardCall, UserError, input_length
from jaxrl_vl.tinker.storage import CheckpointPath, CheckpointStore

LOSS_INPUTS = {"cross_entropy": ("target_tokens", "weights")}
RL_INPUTS = ("target_tokens", "logprobs", "advantages")
ADAM_DEFAULTS = {"learning_rate": 1e-4, "beta1": 0.9, "beta2": 0.95, "eps": 1e-12, "weight_decay": 0.0,
                 "grad_clip_norm": 0.0}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat()


def _bucket(n: int, minimum: int) -> int:
    """Next power of two >= n (bounds the number of jit compilations)."""
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def _make_optimizer() -> optax.GradientTransformation:
    return optax.inject_hyperparams(optax.adamw)(learning_rate=1e-4, b1=0.9, b2=0.95, eps=1e-12,
                                                 weight_decay=0.0)


@dataclasses.dataclass
class TrainingModel:
    model_id: str
    session_id: str
    base_model: str
    lora_cfg: LoraConfig
    lora: dict
    opt_state: object
    grads: dict | None = None
    step: int = 0
    user_metadata: dict | None = None
    last_request_time: str = dataclasses.field(default_factory=_now)
    last_checkpoint: dict | None = None
    last_sampler_checkpoint: dict | None = None


@functools.partial(jax.jit, static_argnames=("loss_fn", "config_items", "lora_cfg", "model_config", "with_grad"))
def _loss_step(lora, base, batch, *, loss_fn, config_items, lora_cfg, model_config, with_grad):
    """-> (loss_sum, target_logprobs [B, L], elementwise [B, L], grads | None)."""
    inputs = {k: batch[k] for k in ("weights", "logprobs", "advantages") if k in batch}
    model_batch = {k: v for k, v in batch.items() if k not in ("target_tokens", "loss_mask", *inputs)}

    def loss(lora_tree):
        logits = apply(overlay(base, lora_tree, lora_cfg), model_batch, model_config)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        target = jnp.take_along_axis(logp, batch["target_tokens"][..., None].astype(jnp.int32), axis=-1)[..., 0]
        total, elementwise = tinker_loss(loss_fn, target, inputs, dict(config_items), valid_mask=batch["loss_mask"])
        return total, (target, elementwise)

    if with_grad:
        (total, (target, elementwise)), grads = jax.value_and_grad(loss, has_aux=True)(lora)
        return total, target, elementwise, grads
    total, (target, elementwise) = loss(lora)
    return total, target, elementwise, None


@jax.jit
def _adam_update(lora, opt_state, grads, clip_norm):
    """Global-norm clipping (clip_norm <= 0: off), then AdamW with the injected hyperparameters."""
    norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree_util.tree_leaves(grads)))
    scale = jnp.where((clip_norm > 0) & (norm > clip_norm), clip_norm / jnp.maximum(norm, 1e-12), 1.0)
    grads = jax.tree_util.tree_map(lambda g: g * scale, grads)
    updates, opt_state = _make_optimizer().update(grads, opt_state, lora)
    return optax.apply_updates(lora, updates), opt_state, norm


class TrainingBackend:
    def __init__(self, model_dir: str, store: CheckpointStore, *, model_name: str | None = None):
        self.model_name = model_name or model_dir  # what clients call it (hub id or path)
        self.model_dir = _resolve_dir(model_dir)  # a local folder (hub ids are fetched once)
        self.config, params = load(self.model_dir)
        self.params = jax.tree_util.tree_map(jnp.asarray, params)
        self.expander = ImageExpander(self.model_dir, self.config.image_token_id, self.config.vision.spatial_merge_size,
                                      text_substitute_id=self.config.video_token_id)
        self.store = store
        self.models: dict[str, TrainingModel] = {}
        # sampler checkpoints' LoRA trees, for prompt logprobs (adapter folder -> (lora, cfg))
        self._sampler_loras: OrderedDict[str, tuple[dict, LoraConfig]] = OrderedDict()

    # ---- model lifecycle -------------------------------------------------------------------------
    def get(self, model_id: str) -> TrainingModel:
        model = self.models.get(model_id)
        if model is None:
            raise UserError(f"unknown model_id {model_id!r}; create it with create_model first "
                            f"(known: {sorted(self.models)[:10]})")
        model.last_request_time = _now()
        return model

    def create_model(self, model_id: str, session_id: str, lora_config: dict | None, *,
                     user_metadata: dict | None = None) -> TrainingModel:
        lora_config = lora_config or {}
        rank = int(lora_config.get("rank", 32))
        if rank < 1:
            raise UserError(f"lora_config.rank={rank}: must be >= 1")
        cfg = lora_config_from_tinker(rank, train_attn=bool(lora_config.get("train_attn", True)),
                                      train_mlp=bool(lora_config.get("train_mlp", True)),
                                      train_unembed=bool(lora_config.get("train_unembed", True)))
        seed = int(lora_config.get("seed") or 0)
        lora = init_lora(self.params, cfg, jax.random.PRNGKey(seed))
        model = TrainingModel(model_id, session_id, self.model_name, cfg, lora, _make_optimizer().init(lora),
                              user_metadata=user_metadata)
        self.models[model_id] = model
        return model

    # ---- forward / backward ----------------------------------------------------------------------
    def _row(self, i: int, datum: Datum, loss_fn: str) -> dict:
        where = f"data[{i}]"
        expanded = self.expander.expand(datum.chunks, f"{where}.model_input")
        n = len(expanded["input_ids"])
        claimed = input_length(datum.chunks)
        if claimed is not None and claimed != n:
            raise UserError(f"{where}: model input expands to {n} tokens but the client counts {claimed}")
        needed = LOSS_INPUTS.get(loss_fn, RL_INPUTS)
        missing = [k for k in needed if k not in datum.loss_fn_inputs]
        if missing:
            raise UserError(f"{where}.loss_fn_inputs: loss_fn {loss_fn!r} needs {list(needed)}; missing {missing}")
        row = {"input_ids": expanded["input_ids"], "loss_mask": np.ones(n, np.float32)}
        if expanded["pixel_values"] is not None:
            row["pixel_values"] = expanded["pixel_values"]
            row["image_grid_thw"] = expanded["image_grid_thw"]
        for key in needed:
            value = np.asarray(datum.loss_fn_inputs[key])
            if value.ndim != 1 or value.shape[0] != n:
                raise UserError(f"{where}.loss_fn_inputs[{key!r}] has shape {list(value.shape)}; this server "
                                f"needs shape [{n}] (= model_input length with images expanded)")
            row[key] = value.astype(np.int32 if key == "target_tokens" else np.float32)
        vocab = self.config.text.vocab_size
        bad = (row["target_tokens"] < 0) | (row["target_tokens"] >= vocab)
        if bad.any():
            raise UserError(f"{where}.loss_fn_inputs['target_tokens'] has ids outside [0, {vocab}): "
                            f"{row['target_tokens'][bad][:5].tolist()}")
        return row

    def _batch(self, rows: list[dict]) -> dict:
        length = _bucket(max(len(r["input_ids"]) for r in rows), 32)
        padded_rows = list(rows) + [self._padding_row(rows[0]) for _ in range(_bucket(len(rows), 1) - len(rows))]
        patches = sum(len(r.get("pixel_values", ())) for r in rows)
        return make_batch(padded_rows, self.config, pad_to_length=length,
                          pad_patches_to=_bucket(patches, 16) if patches else None)

    def _padding_row(self, like: dict) -> dict:
        row = {k: np.zeros(1, v.dtype) for k, v in like.items()
               if k not in ("pixel_values", "image_grid_thw")}
        row["input_ids"] = np.zeros(1, np.int32)
        return row

    def forward_backward(self, call: ForwardBackwardCall) -> tuple[list[dict[str, np.ndarray]], dict[str, float]]:
        """-> (per-datum {"logprobs", "elementwise_loss"} float32 [N_i], metrics with "loss:sum")."""
        if call.loss_fn not in SUPPORTED_LOSSES:
            raise UserError(f"loss_fn {call.loss_fn!r} is not supported by this server; use one of "
                            f"{list(SUPPORTED_LOSSES)} (stable_reinforce/gspo/custom are not implemented; the "
                            "cookbook's RL recipes take loss_fn=importance_sampling)")
        try:
            config = resolve_loss_fn_config(call.loss_fn, call.loss_fn_config)
        except ValueError as error:
            raise UserError(str(error)) from error
        if not call.data:
            raise UserError("forward_backward: data is empty")
        model = self.get(call.model_id)
        rows = [self._row(i, d, call.loss_fn) for i, d in enumerate(call.data)]
        batch = self._batch(rows)
        total, target, elementwise, grads = _loss_step(
            model.lora, self.params, batch, loss_fn=call.loss_fn, config_items=tuple(sorted(config.items())),
            lora_cfg=model.lora_cfg, model_config=self.config, with_grad=not call.forward_only)
        if grads is not None:
            model.grads = grads if model.grads is None else jax.tree_util.tree_map(jnp.add, model.grads, grads)
        target, elementwise = np.asarray(target), np.asarray(elementwise)
        outputs = [{"logprobs": target[i, :len(r["input_ids"])], "elementwise_loss": elementwise[i, :len(r["input_ids"])]}
                   for i, r in enumerate(rows)]
        loss_sum = float(total)
        if not np.isfinite(loss_sum):
            raise UserError(f"forward_backward: loss is not finite ({loss_sum}); check logprobs/advantages inputs")
        return outputs, {"loss:sum": loss_sum}

    # ---- optimizer -------------------------------------------------------------------------------
    def optim_step(self, model_id: str, adam_params: dict | None) -> dict[str, float]:
        model = self.get(model_id)
        params = {**ADAM_DEFAULTS, **{k: v for k, v in (adam_params or {}).items() if v is not None}}
        if params.get("type", "adam") not in ("adam", "adamw"):
            raise UserError(f"optim_step: optimizer type {params['type']!r} is not supported; send adam_params")
        unknown = sorted(set(params) - set(ADAM_DEFAULTS) - {"type"})
        if unknown:
            raise UserError(f"adam_params: unknown keys {unknown}; valid: {sorted(ADAM_DEFAULTS)}")
        if model.grads is None:
            raise UserError(f"optim_step on {model_id}: no gradients accumulated; call forward_backward first")
        hp = model.opt_state.hyperparams
        for ours, theirs in (("learning_rate", "learning_rate"), ("b1", "beta1"), ("b2", "beta2"), ("eps", "eps"),
                             ("weight_decay", "weight_decay")):
            hp[ours] = jnp.asarray(float(params[theirs]), jnp.float32)
        model.lora, model.opt_state, norm = _adam_update(model.lora, model.opt_state, model.grads,
                                                         jnp.float32(params["grad_clip_norm"]))
        model.grads = None
        model.step += 1
        return {"grad_norm:mean": float(norm), "learning_rate:mean": float(params["learning_rate"])}

    # ---- checkpoints -----------------------------------------------------------------------------
    def save_state(self, model_id: str, name: str, *, ttl_seconds=None, user_metadata=None) -> str:
        model = self.get(model_id)
        trees = {"lora": jax.device_get(model.lora), "opt_state": jax.device_get(model.opt_state)}
        info = {"step": model.step, "lora_cfg": dataclasses.asdict(model.lora_cfg), "base_model": model.base_model}
        cp = CheckpointPath(model_id, "weights", name)
        path = self.store.save_state(cp, trees, info, user_metadata=user_metadata, ttl_seconds=ttl_seconds)
        model.last_checkpoint = self._checkpoint_json(cp)
        return path

    def load_state(self, model_id: str, cp: CheckpointPath, *, with_optimizer: bool) -> None:
        """Loads weights (and optionally the optimizer state) into an existing model. The stored trees
        must match the structure of a fresh LoRA / optimizer state for the saved LoRA config."""
        model = self.get(model_id)
        trees, info = self.store.load_state(cp)
        cfg = LoraConfig(**{**info["lora_cfg"], "targets": tuple(info["lora_cfg"]["targets"])})
        template = init_lora(self.params, cfg, jax.random.PRNGKey(0))
        try:
            lora = serialization.from_state_dict(template, trees["lora"])
            opt_state = (serialization.from_state_dict(_make_optimizer().init(template), trees["opt_state"])
                         if with_optimizer else None)
            if jax.tree_util.tree_map(np.shape, lora) != jax.tree_util.tree_map(np.shape, template):
                raise ValueError("LoRA array shapes differ")
        except (KeyError, ValueError) as error:
            raise UserError(f"checkpoint {cp.tinker_path} does not match its LoRA config {cfg}: {error}") from error
        model.lora_cfg = cfg
        model.lora = jax.tree_util.tree_map(jnp.asarray, lora)
        model.opt_state = (jax.tree_util.tree_map(jnp.asarray, opt_state) if with_optimizer
                           else _make_optimizer().init(model.lora))
        model.step = int(info["step"]) if with_optimizer else 0
        model.grads = None

    def create_from_state(self, model_id: str, session_id: str, cp: CheckpointPath, *, with_optimizer: bool,
                          user_metadata=None) -> TrainingModel:
        _, info = self.store.load_state(cp)
        cfg = info["lora_cfg"]
        self.create_model(model_id, session_id, {"rank": cfg["rank"], "train_attn": "attention" in cfg["targets"],
                                                 "train_mlp": "mlp" in cfg["targets"],
                                                 "train_unembed": "unembed" in cfg["targets"]},
                          user_metadata=user_metadata)
        self.load_state(model_id, cp, with_optimizer=with_optimizer)
        return self.models[model_id]

    def export_sampler(self, model_id: str, cp: CheckpointPath, *, ttl_seconds=None, user_metadata=None) -> str:
        """Writes the model's LoRA as a PEFT adapter in a NEW version folder; returns that folder."""
        model = self.get(model_id)
        folder = self.store.new_sampler_version(cp)
        export_peft(jax.device_get(model.lora), model.lora_cfg, self.config, folder,
                    base_model_name_or_path=os.path.abspath(self.model_dir))
        self._remember_sampler_lora(folder, model.lora, model.lora_cfg)
        self.store.commit_sampler_version(cp, folder, user_metadata=user_metadata, ttl_seconds=ttl_seconds)
        model.last_sampler_checkpoint = self._checkpoint_json(cp)
        return folder

    def _remember_sampler_lora(self, folder: str, lora: dict, cfg: LoraConfig) -> None:
        self._sampler_loras[folder] = (lora, cfg)
        while len(self._sampler_loras) > 8:
            self._sampler_loras.popitem(last=False)

    def prompt_logprobs(self, chunks: list, adapter_folder: str | None) -> np.ndarray:
        """log p(token t | tokens < t) for every prompt position, float32 [N] with NaN at 0, from the JAX
        model with the sampler checkpoint's LoRA (None: the base model). Images expanded as in training.

        Served here rather than by vLLM: vLLM 0.32 CPU crashes its engine (einsum size mismatch in the
        LoRA logits op) on prompt logprobs for batched requests of an adapter that adapts lm_head."""
        if adapter_folder is None:
            lora, cfg = {}, LoraConfig(rank=1)  # an empty tree: overlay leaves the base params as they are
        else:
            if adapter_folder not in self._sampler_loras:
                tree, cfg = import_peft(adapter_folder)
                self._remember_sampler_lora(adapter_folder, tree, cfg)
            lora, cfg = self._sampler_loras[adapter_folder]
        expanded = self.expander.expand(chunks, "prompt")
        ids = expanded["input_ids"]
        row = {"input_ids": ids, "loss_mask": np.ones(len(ids), np.float32),
               "target_tokens": np.append(expanded["token_ids"][1:], 0).astype(np.int32),
               "weights": np.zeros(len(ids), np.float32)}
        if expanded["pixel_values"] is not None:
            row["pixel_values"], row["image_grid_thw"] = expanded["pixel_values"], expanded["image_grid_thw"]
        _, target, _, _ = _loss_step(lora, self.params, self._batch([row]), loss_fn="cross_entropy", config_items=(),
                                     lora_cfg=cfg, model_config=self.config, with_grad=False)
        out = np.full(len(ids), np.nan, np.float32)
        out[1:] = np.asarray(target)[0, :len(ids) - 1]
        return out

    @staticmethod
    def _checkpoint_json(cp: CheckpointPath) -> dict:
        return {"checkpoint_id": f"{cp.kind}/{cp.name}", "tinker_path": cp.tinker_path, "time": _now(),
                "checkpoint_type": "training" if cp.kind == "weights" else "sampler"}
