"""RL on Maze2D with the trainer on Cloud TPU hosts and vLLM on a separate GPU host (disaggregated).

    # GPU host (private IP 10.128.0.12), same starting checkpoint as model.path below:
    export JAXRL_VL_SERVER_TOKEN=...            # the same secret on both sides
    bash launch/vllm_gpu_server.sh --model /models/sft_maze_export --host 10.128.0.12 --port 8000
    # TPU side (every worker), e.g. through the queued-resources CLI:
    python -m launch.tpu up maze-rl --tpu=v5e-8 --zone=... --project=... --config=configs/rl_maze_disaggregated.py \\
        --env=JAXRL_VL_SERVER_TOKEN -- --config.vllm.url=http://10.128.0.12:8000

Rendering and sampling go to the GPU server over HTTP; after every optimizer step the new weights
are streamed to it (`vllm.transport="stream"`: no shared disk between the hosts) as weight version
= step. The server must start from the same weights as `model.path` (copy the checkpoint to both).
"""
import rl_maze


def get_config():
    c = rl_maze.get_config()
    c.name = "rl_maze_disaggregated"
    c.model.path = "runs/sft_maze/export"      # the trainer's copy; the GPU server loads its own copy
    c.model.dtype = "bfloat16"                 # compute dtype on TPU; master weights stay fp32
    c.mesh.fsdp = -1                           # shard params over every TPU chip
    c.vllm.url = "http://10.128.0.12:8000"     # the GPU host's private address (launch/vllm_gpu_server.sh --host/--port)
    c.vllm.served_model_name = "policy"        # vllm_gpu_server.sh --served-model-name
    c.vllm.transport = "stream"                # weights over the network, not through a shared folder
    c.vllm.token_env = "JAXRL_VL_SERVER_TOKEN"  # environment variable holding the server's bearer token
    c.vllm.max_concurrent_requests = 64        # a GPU server batches many more episodes than a CPU one
    c.rl.max_concurrent_episodes = 64
    c.rl.num_groups = 16
    c.rl.samples_per_group = 8
    return c
