"""RL defaults shared by configs/rl_*.py: `config.rl` (episodes, budgets, advantages),
`config.loss` (policy loss) and `config.vllm` (the rollout server). Every key can be overridden
on the command line, e.g. `--config.rl.samples_per_group=8 --config.loss.name=cispo`.
Zero means "off / not set" for the optional numbers (ml_collections keys keep one type).
"""
import ml_collections

import base


def get_config() -> ml_collections.ConfigDict:
    c = base.get_config()
    c.trainer = "rl"
    c.train.num_steps = 20            # RL steps (one optimizer update + one weight push each)
    c.train.grad_accum_steps = 1      # micro-batches per update
    c.optim.learning_rate = 1e-5
    c.optim.schedule = "constant"
    c.optim.warmup_steps = 0
    c.optim.weight_decay = 0.0
    c.checkpoint.every_steps = 5

    c.rl = rl = ml_collections.ConfigDict()
    rl.env = "maze2d"                 # a registered env (jaxrl_vl.envs.make_env)
    rl.env_kwargs = ml_collections.ConfigDict()       # passed to make_env for training episodes
    rl.eval_env_kwargs = ml_collections.ConfigDict()  # overrides of env_kwargs for held-out episodes
    rl.num_groups = 8                 # env seeds per step
    rl.samples_per_group = 4          # episodes per seed (GRPO group size n)
    rl.updates_per_step = 1           # PPO mini-batches: optimizer updates per RL step, each on 1/k of the episodes
                                      # (shuffled; train.grad_accum_steps micro-batches each)
    rl.max_concurrent_episodes = 16
    rl.max_turns = 0                  # 0 = the env's own max_turns
    rl.max_tokens_per_turn = 32
    rl.max_sequence_tokens = 2048     # prompt + all turns of one training sequence
    rl.max_generated_tokens = 0       # sampled tokens per episode, 0 = no limit
    rl.temperature = 1.0              # vLLM's logprobs are of the temperature-1 distribution: keep 1.0
    rl.top_p = 1.0
    rl.eval_temperature = 0.0         # greedy held-out episodes
    rl.eval_samples_per_seed = 1      # held-out episodes per seed (> 1 with eval_temperature > 0: success averaged)
    rl.sampling_seed = 0
    rl.advantage = "grpo"             # grpo | grpo_no_std | dr_grpo | rloo | reinforce_plus_plus[_baseline]
    rl.filter_zero_variance_groups = True  # DAPO dynamic sampling: drop groups whose rewards are all equal
    rl.step_advantage_weight = 0.0    # > 0: GiGPO turn-level credit, A = A_episode + w * A_step over turns taken in the
                                      # same env state (envs with state_key(); losses/step_advantages.py)
    rl.negative_advantage_weight = 1.0  # < 1: negative advantages scaled down (0 = positives only; W-REINFORCE 0.1)
    rl.step_discount = 0.95           # gamma of the per-turn returns the step-level groups compare
    rl.train_seed_offset = 0          # step s uses env seeds offset + (s-1)*num_groups + [0, num_groups)
    rl.eval_seed_offset = 1_000_000   # held-out seeds offset + [0, eval_episodes), same before and after RL
    rl.eval_episodes = 32
    rl.save_samples = 2               # rollouts (with images) saved per saving step, under RUN_DIR/samples
    rl.save_samples_every_steps = 10
    rl.length_multiple = 256          # training rows padded to a multiple of this (few jit shapes)
    rl.patch_multiple = 256
    rl.drift_turns_logged = 8
    rl.max_staleness = 0              # 0 = synchronous; 1 = generate step k+1 while training step k
    rl.eval_every_steps = 0           # > 0: held-out episodes every this many steps too (eval_step_<k>/ metrics)
    rl.record_rollouts = False        # save each step's groups to RUN_DIR/rollouts (replayable)
    rl.replay_rollouts_from = ""      # a RUN_DIR/rollouts folder: train on those groups, no vLLM (benchmarks, debugging)

    c.loss = loss = ml_collections.ConfigDict()
    loss.name = "ppo"                 # ppo | gspo | cispo | importance_sampling (jaxrl_vl.losses registry)
    loss.aggregation = "token-mean"   # token-mean | sequence-mean | sequence-mean-token-sum | sum
    loss.clip_eps_low = 0.2
    loss.clip_eps_high = 0.28         # DAPO clip-higher
    loss.dual_clip_c = 0.0            # 0 = off, else e.g. 3.0
    loss.tis_cap = 0.0                # truncated IS cap on trainer/rollout ratio, 0 = off (needs old_logprobs="trainer")
    loss.kl_coef = 0.0                # > 0: KL to the initial policy as a loss term
    loss.kl_estimator = "k3"
    loss.token_sum_divisor = 1.0
    loss.old_logprobs = "rollout"     # ratio denominator: "rollout" (vLLM) | "trainer" (pre-update, sg)

    c.vllm = v = ml_collections.ConfigDict()
    v.url = ""                        # running server(s), comma separated; empty = start one on model.path
    v.served_model_name = ""
    v.device = "cpu"
    v.max_model_len = 2048
    v.max_num_seqs = 8
    v.cpu_kv_cache_gib = 1            # integer GiB (vLLM's VLLM_CPU_KVCACHE_SPACE)
    v.cpu_cores = "auto"              # CPU server's model cores: "auto" (vLLM keeps one for itself) | "all" | "0-3"
    v.max_images_per_prompt = 8
    v.enforce_eager = True
    v.max_concurrent_requests = 16
    v.transport = "reload"            # weight push: "reload" (shared disk, /dev/shm) | "stream" (over HTTP, no shared disk)
                                      # | "shm" (same host, CPU eager server: the trainer writes the server's weights in place)
    v.token_env = ""                  # env var holding the server's bearer token (launch/vllm_gpu_server.sh); "" = none
    v.on_server_failure = "restart"   # a started server dies mid-run: "restart" it on the current weights and redo
                                      # the step's rollouts, or "stop" the run with an error naming it and its log
    v.max_server_restarts = 3         # restarts per run before stopping anyway
    return c
