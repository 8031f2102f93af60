"""HF export of a training state or of any checkpoint in a run directory.

    python -m jaxrl_vl.train.export RUN_DIR [--step N] [--out DIR]

writes a Hugging Face folder (config.json, safetensors, plus the base model's tokenizer,
chat template and processor files) that transformers and vLLM load. With LoRA the adapter is
merged into the export, and the PEFT adapter is written next to it (`<out>_adapter`).
"""
from __future__ import annotations

import argparse
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from ml_collections import ConfigDict

from jaxrl_vl import models
from jaxrl_vl.train.distributed import host_local


def export_state(state, model_config, out_dir: str, *, copy_from: str | None, lora_cfg=None) -> str | None:
    """Export `state.params` (+ merged `state.lora`) to out_dir (process 0 writes); returns out_dir."""
    params, lora = host_local(state.params), host_local(state.lora) if state.lora is not None else None
    if jax.process_index() != 0:
        return None
    return export_params(params, lora, model_config, out_dir, copy_from=copy_from, lora_cfg=lora_cfg)


def export_params(params, lora, model_config, out_dir: str, *, copy_from: str | None, lora_cfg=None) -> str:
    params = jax.device_get(params)
    if lora is not None:
        from jaxrl_vl.models import lora as lora_lib
        lora = jax.device_get(lora)
        lora_lib.export_peft(lora, lora_cfg, model_config, out_dir.rstrip("/") + "_adapter",
                             base_model_name_or_path=copy_from)
        params = jax.device_get(lora_lib.merge(params, lora, lora_cfg))
    models.export(params, model_config, out_dir, copy_from=copy_from)
    return out_dir


def export_checkpoint(run_dir: str, step: int | None = None, out_dir: str | None = None) -> str:
    """Export checkpoint `step` (default the latest) of a run; its config.json names the base model."""
    with open(os.path.join(run_dir, "config.json")) as f:
        config = ConfigDict(json.load(f))
    from jaxrl_vl.train.setup import checkpoint_dir, ensure_model_dir
    model_dir = ensure_model_dir(config.model)
    with open(os.path.join(model_dir, "config.json")) as f:
        model_config = models.ModelConfig.from_hf_dict(json.load(f))
    directory = checkpoint_dir(config, run_dir)
    manager = ocp.CheckpointManager(directory, item_names=("state", "data"))
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no finished checkpoint in {directory}")
    # Restored without a target: a plain tree of numpy arrays keyed like TrainState's fields.
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    manager.close()
    state = restored.state
    lora_cfg = None
    if state.get("lora") is not None and config.lora.enabled:
        from jaxrl_vl.models.lora import LoraConfig
        lora_cfg = LoraConfig(rank=config.lora.rank, alpha=config.lora.alpha, targets=tuple(config.lora.targets),
                              include_vision=config.lora.include_vision)
    params = jax.tree.map(np.asarray, state["params"])
    lora = jax.tree.map(np.asarray, state["lora"]) if lora_cfg is not None else None
    out_dir = out_dir or os.path.join(run_dir, f"export_step_{step}")
    return export_params(params, lora, model_config, out_dir, copy_from=model_dir, lora_cfg=lora_cfg)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--out", default=None, help="output folder (default RUN_DIR/export_step_<N>)")
    args = parser.parse_args(argv)
    print(json.dumps({"export_dir": export_checkpoint(args.run_dir, args.step, args.out)}))


if __name__ == "__main__":
    main()
