"""Defaults shared by every experiment config: one default per knob.

An experiment file does `config = base.get_config()` then changes what it needs. Every key can
be overridden on the command line: `--config.optim.learning_rate=1e-3`.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.trainer = "sft"          # "sft" | "rl"
    c.name = "run"             # default run dir is runs/<name>; rerunning the same command resumes it
    c.run_dir = ""             # where checkpoints, metrics.jsonl, plots and the export go
    c.seed = 0
    c.distributed = "auto"     # jax.distributed.initialize(): "auto" (multi-host TPU / coordinator env), "on", "off"

    c.model = ml_collections.ConfigDict()
    c.model.path = ""          # HF checkpoint folder (config.json, safetensors, tokenizer, processor)
    c.model.build_size = ""    # "tiny" | "small": build model.path with tools/make_tiny_model.py if missing
    c.model.arch = "qwen3_vl"  # arch used when building ("qwen3_vl" | "qwen2_5_vl")
    c.model.random_init = False  # train from freshly initialised weights of the checkpoint's config
    c.model.dtype = "float32"  # compute dtype ("float32" | "bfloat16")
    c.model.param_dtype = "float32"  # stored dtype of the model params ("float32" | "bfloat16"; LoRA adapters stay fp32)
    c.model.attention = "auto"  # text attention: "auto" (cuDNN on GPU in bf16, else XLA) | "xla" | "cudnn" | "cudnn_causal" (unpacked rows only)
    c.model.remat = "none"     # activation rematerialisation policy of models.apply
    # "scan": lax.scan over stacked layers (fast compile); "unrolled": params stored as per-layer lists and run
    # by a Python loop (GPU: the fastest steps, see README Performance; compiles take minutes at 2B scale)
    c.model.layer_loop = "scan"

    c.lora = ml_collections.ConfigDict()
    c.lora.enabled = False     # train only a LoRA adapter (params frozen)
    c.lora.rank = 8
    c.lora.alpha = 16.0
    c.lora.targets = ("attention", "mlp")  # or "unembed", "merger", module names (models/lora.py)
    c.lora.include_vision = False

    c.mesh = ml_collections.ConfigDict()  # device mesh (jaxrl_vl/sharding.py); -1 = the rest
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1
    c.mesh.fsdp_gather = "use"  # "use" = XLA gathers each weight where used (ZeRO-3); "step" = the compute-dtype copy gathered once per micro-batch, gradient reduce-scattered (faster on 2 GPUs, one more model copy)

    c.data = ml_collections.ConfigDict()
    c.data.source = "digits"   # "digits" | "image_folder" | "jsonl" | "hf_disk" | "maze2d"
    c.data.path = ""           # dataset location (folder / jsonl); generated for "digits" when empty
    c.data.train_split = "train"
    c.data.eval_split = "test"
    c.data.max_length = 256    # tokens per row; longer examples are truncated (counted, warned)
    c.data.loss_on = "last"    # assistant turns that carry loss: "last" | "all"
    c.data.packing = False     # pack several examples per row
    c.data.bad_examples = "skip"  # "skip" (count and go on) | "fail"
    c.data.num_epochs = 0      # 0 = repeat forever (training length set by train.num_steps)
    c.data.shuffle = True
    c.data.prefetch = 2        # batches prepared ahead in background threads (0 = none)

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 100    # optimizer updates
    c.train.batch_size = 8     # rows per optimizer update (all micro-batches together)
    c.train.grad_accum_steps = 1  # micro-batches per update (batch_size must divide evenly)
    c.train.log_every_steps = 1
    c.train.loss_chunk_size = 0  # >0: cross-entropy over hidden states in chunks of this many tokens (no full logits; SFT forms the gradient in the forward pass: losses/fused_nll.py)
    c.train.target_positions_multiple = 0  # >0 (with loss_chunk_size; SFT and RL): logits only where a target follows, their count rounded up to this multiple (each count is a compiled shape)
    c.train.peak_flops_per_device = 0.0  # for MFU; 0 = from the device kind (rough on CPU)
    c.train.cast_once_per_step = True  # cast fp32 matrices to model.dtype once per step (same values as at each use)

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 1e-4
    c.optim.schedule = "cosine"  # "cosine" | "linear" | "constant"
    c.optim.warmup_steps = 10
    c.optim.end_learning_rate_fraction = 0.1
    c.optim.weight_decay = 0.01
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.max_grad_norm = 1.0  # 0 = no clipping
    c.optim.moment_dtype = "float32"  # AdamW first moment ("float32" | "bfloat16"); the second follows the params' dtype

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.dir = ""       # default RUN_DIR/checkpoints; may be gs://bucket/path (Orbax writes there)
    c.checkpoint.every_steps = 50
    c.checkpoint.keep = 2
    c.checkpoint.async_save = True
    c.checkpoint.resume = True  # resume from the run dir's latest checkpoint when there is one

    c.eval = ml_collections.ConfigDict()
    c.eval.every_steps = 50     # 0 = only at the end
    c.eval.nll_num_examples = 64  # held-out examples scored for NLL (0 = skip)
    c.eval.num_generation_examples = 64  # held-out examples for greedy accuracy (0 = skip)
    c.eval.max_new_tokens = 24
    c.eval.vllm_url = ""        # a running vLLM server to push weights into and sample from
    c.eval.generation_backend = "auto"  # "auto" (vLLM if configured/available, else jax) | "vllm" | "jax"

    c.metrics = ml_collections.ConfigDict()
    c.metrics.use_wandb = True  # offline (files in the run dir) unless wandb_project is set
    c.metrics.wandb_project = ""
    c.metrics.progress_bar = True
    c.metrics.plot_at_end = True

    c.export = ml_collections.ConfigDict()
    c.export.at_end = True      # HF export of the final params into RUN_DIR/export
    return c
