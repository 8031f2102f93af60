"""GPU presets: SFT and RL of Qwen3-VL 2B / 4B / 8B with the settings the step benchmark is fastest with.

    python launch/train.py --config configs/gpu.py:sft_2b --config.data.path=DATA   # one GPU or all of them
    python launch/train.py --config configs/gpu.py:rl_8b --config.vllm.url=http://GPU_HOST:8000
    python launch/train.py --config configs/gpu.py:sft_8b_lora --config.data.path=DATA

Presets: {sft,rl}_{2b,4b,8b} (full fine-tune; 8B needs several GPUs: fp32 master weights and AdamW states do
not fit one 80 GB card) and {sft,rl}_8b_lora (LoRA rank 32 on attention + MLP; fits one H100). The fast
settings (README "Performance"; tools/bench_train.py measures the same step):
  model.dtype = param_dtype = optim.moment_dtype = bfloat16   bf16 compute, bf16 stored weights and AdamW moments
                                                              (the PyTorch reference's recipe; `model.param_dtype=
                                                              float32` keeps fp32 master weights at +50% memory)
  model.attention = cudnn_causal (unpacked rows; packed: cudnn)   cuDNN flash attention
  model.layer_loop = unrolled, model.remat = none             per-layer params, no recomputation (2B/4B; 8B: dots)
  train.loss_chunk_size = 1024, train.target_positions_multiple = 256   fused chunked cross-entropy, logits only
                                                              where a target follows
  mesh.fsdp = -1 (all GPUs), mesh.fsdp_gather = step          the bf16 copy gathered once per micro-batch
`model.path` is the Hugging Face hub id (needs the network once) or a local folder; on a machine without network,
build a same-shaped random checkpoint: `tools/make_tiny_model.py --like qwen3_vl_2b --out DIR`.
"""
import base
import rl_maze

MODELS = {"2b": "Qwen/Qwen3-VL-2B-Instruct", "4b": "Qwen/Qwen3-VL-4B-Instruct", "8b": "Qwen/Qwen3-VL-8B-Instruct"}


def fast_gpu_settings(c, size: str, lora: bool):
    c.model.path, c.model.build_size = MODELS[size], ""
    c.model.dtype = c.model.param_dtype = "bfloat16"  # LoRA: the frozen base in bf16, the adapters fp32
    c.optim.moment_dtype = "float32" if lora else "bfloat16"
    c.model.attention = "cudnn_causal"
    c.model.layer_loop = "unrolled"
    c.model.remat = "dots" if size == "8b" and not lora else "none"
    c.train.loss_chunk_size = 1024
    c.train.target_positions_multiple = 256
    c.mesh.fsdp, c.mesh.fsdp_gather = -1, "step"
    c.lora.enabled = lora
    c.lora.rank, c.lora.alpha = 32, 32.0
    return c


def sft(size: str, lora: bool):
    c = base.get_config()
    c.name = f"sft_qwen3_vl_{size}" + ("_lora" if lora else "")
    c.data.source, c.data.path = "jsonl", ""
    c.data.max_length = 4096
    c.train.batch_size = 2
    c.train.num_steps = 1000
    c.optim.learning_rate = 1e-4 if lora else 1e-5
    c.eval.num_generation_examples = 0  # greedy accuracy needs a vLLM server; the held-out NLL stays
    return fast_gpu_settings(c, size, lora)


def rl(size: str, lora: bool):
    c = rl_maze.get_config()
    c.name = f"rl_qwen3_vl_{size}" + ("_lora" if lora else "")
    c.data.max_length = 4096
    c.vllm.device = "gpu"
    c.vllm.max_model_len = 8192
    c.rl.num_groups, c.rl.samples_per_group = 16, 8
    c.rl.length_multiple = 256
    c.rl.max_sequence_tokens = 4096
    c.loss.old_logprobs = "trainer"  # bf16 vLLM and bf16 training differ; pi_old from the trainer's numerics
    c.optim.learning_rate = 1e-5 if lora else 1e-6
    c = fast_gpu_settings(c, size, lora)
    c.model.attention = "cudnn_causal"  # one episode per row
    return c


def get_config(preset: str = "sft_2b"):
    task, _, rest = preset.partition("_")
    size, _, variant = rest.partition("_")
    if task not in ("sft", "rl") or size not in MODELS or variant not in ("", "lora"):
        raise ValueError(f"configs/gpu.py:{preset}: presets are {{sft,rl}}_{{2b,4b,8b}}[_lora], e.g. sft_2b, rl_8b_lora")
    return (sft if task == "sft" else rl)(size, variant == "lora")
