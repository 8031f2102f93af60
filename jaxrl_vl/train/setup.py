"""What every training run does before its first step: run directory, base model, data records.

All paths in configs are relative to the current directory (the repo root for the README's
commands) unless absolute.
"""
from __future__ import annotations

import json
import logging
import os
import shutil

import numpy as np

log = logging.getLogger(__name__)
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA_SOURCES = ("digits", "image_folder", "jsonl", "hf_disk")


def resolve_run_dir(config) -> str:
    """`config.run_dir`, or runs/<config.name>: the same command always finds its own checkpoints."""
    run_dir = config.run_dir or os.path.join("runs", config.name)
    run_dir = os.path.abspath(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    return run_dir


def checkpoint_dir(config, run_dir: str) -> str:
    """`checkpoint.dir` (local or gs://...) or RUN_DIR/checkpoints."""
    return config.checkpoint.dir or os.path.join(run_dir, "checkpoints")


def save_run_config(config, run_dir: str) -> None:
    """RUN_DIR/config.json: the resolved config (export and plots read it back)."""
    path = os.path.join(run_dir, "config.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(config.to_json(indent=2, sort_keys=True))
    os.replace(tmp, path)


def ensure_model_dir(model_config) -> str:
    """The base checkpoint folder: a local folder with config.json, a Hugging Face hub id (owner/name, fetched
    into the HF cache), or built offline (models/tiny_checkpoint.py) when `model.build_size` is set and the
    folder is missing (written to a temporary folder, then renamed: never half-built)."""
    path = os.path.abspath(model_config.path) if model_config.path else ""
    if path and os.path.exists(os.path.join(path, "config.json")):
        return path
    if not model_config.build_size:
        if model_config.path and not os.path.exists(model_config.path):
            from jaxrl_vl.models.checkpoint import _resolve_dir
            return _resolve_dir(model_config.path)
        raise FileNotFoundError(
            f"model.path={model_config.path!r} has no config.json; point it at a HF checkpoint folder or hub id, or set "
            f"model.build_size=tiny|small to build one offline (tools/make_tiny_model.py)")
    if not path:
        raise ValueError("model.build_size is set but model.path is empty: say where to build the model")
    from jaxrl_vl.models.tiny_checkpoint import build
    tmp = f"{path}.building-{os.getpid()}"
    log.warning("building the %s %s model into %s", model_config.build_size, model_config.arch, path)
    try:
        build(tmp, arch=model_config.arch, size=model_config.build_size)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        os.rename(tmp, path)
    except OSError:  # another process built it first
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def load_policy(config):
    """Loads (or randomly initialises, with `model.random_init`) the policy for a run.

    Returns (model_dir, model_config, params, lora_rng, state_rng); the rng split is shared by the
    SFT and RL loops so the same seed gives the same initial state in both.
    """
    import jax

    from jaxrl_vl import models

    model_dir = ensure_model_dir(config.model)
    model_config, params = models.load(model_dir)
    init_rng, lora_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.seed), 3)
    if config.model.random_init:
        params = models.init(model_config, init_rng)
    if config.model.layer_loop == "unrolled":
        # stored as per-layer lists (models.layout): the unrolled loop then reads each layer's weights
        # directly instead of slicing a [layers, ...] stack every step (~10% of a 2B GPU step)
        params = models.unstack_layers(params)
    return model_dir, model_config, params, lora_rng, state_rng


def lora_parts(config, params, rng):
    """-> (lora tree or None, overlay fn or None, LoraConfig or None)."""
    if not config.lora.enabled:
        return None, None, None
    from jaxrl_vl.models import lora as lora_lib
    cfg = lora_lib.LoraConfig(rank=config.lora.rank, alpha=config.lora.alpha, targets=tuple(config.lora.targets),
                              include_vision=config.lora.include_vision)
    return lora_lib.init_lora(params, cfg, rng), (lambda p, l: lora_lib.overlay(p, l, cfg)), cfg


def _jsonl_path(path: str, split: str) -> str:
    if os.path.isdir(path):
        candidate = os.path.join(path, f"{split}.jsonl")
        if not os.path.exists(candidate):
            raise FileNotFoundError(f"data.path={path!r} is a folder without {split}.jsonl")
        return candidate
    if split != "train":
        stem, ext = os.path.splitext(path)
        sibling = f"{os.path.dirname(path)}/{split}{ext}"
        if os.path.exists(sibling):
            return sibling
        raise FileNotFoundError(f"data.path={path!r} is a single file; put {split}.jsonl next to it or point "
                                f"data.path at a folder with train.jsonl and {split}.jsonl")
    return path


def load_records(data_config, split: str, report=None) -> list[dict]:
    """Chat records of one split from `data.source` (see configs/base.py)."""
    from jaxrl_vl.data import sources

    source, path = data_config.source, data_config.path
    if source not in DATA_SOURCES:
        raise ValueError(f"data.source={source!r}; choose one of {DATA_SOURCES}")
    if source == "digits":
        from jaxrl_vl.data.digits import write_image_folder
        path = os.path.abspath(path or os.path.join("artifacts", "data", "digits"))
        write_image_folder(path)
        return sources.image_folder_records(path, split)
    if not path:
        raise ValueError(f"data.path is empty; data.source={source!r} needs the dataset's location")
    if source == "image_folder":
        return sources.image_folder_records(path, split)
    if source == "jsonl":
        return sources.read_jsonl(_jsonl_path(path, split), on_bad_record=data_config.bad_examples, report=report)
    return sources.hf_disk_records(path, split, on_bad_record=data_config.bad_examples, report=report)


def fixed_subset(records: list, count: int, seed: int = 0) -> list:
    """`count` records picked by a fixed permutation (sources list class folders in order, so
    taking the first N would evaluate one class only). Same records on every run and resume."""
    order = np.random.default_rng(seed).permutation(len(records))
    return [records[i] for i in order[:count]]


def write_json(path: str, value) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2)
    os.replace(tmp, path)
