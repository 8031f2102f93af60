#!/usr/bin/env python
"""Weight-push benchmark: push time per transport vs one safetensors write to /dev/shm.

    python tools/bench_weight_push.py --model DIR [--repeats 5]

Starts a CPU vLLM server on the checkpoint, pushes the checkpoint's own params `--repeats` times
(versions 1..N) with each implemented transport, and in the same run times writing the same
tensors once to /dev/shm with safetensors (the floor: one copy). Prints JSON with median seconds
and the ratio push / write (target: <= 2 for the `small` model), for the `reload` transport
(/dev/shm + vLLM reload) and the `stream` transport (HTTP chunks into our vLLM backend).
"""
import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxrl_vl.rollout.client import VLLMClient  # noqa: E402
from jaxrl_vl.rollout.server import ServerConfig, start_server, stop_server  # noqa: E402
from jaxrl_vl.rollout.weight_push import push_state_dict, write_weights  # noqa: E402


def time_write_seconds(state: dict, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        folder = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="jaxrl_vl_bench_"))
        try:
            times.append(write_weights(state, folder)[1])
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    return statistics.median(times)


def run(model_dir: str, repeats: int, dtype: str) -> dict:
    from jaxrl_vl.models import load, to_hf_state_dict

    config, params = load(model_dir)
    state = to_hf_state_dict(params, config)
    num_bytes = sum(v.nbytes for v in state.values())
    handle = start_server(ServerConfig(model=model_dir, served_model_name="policy", dtype=dtype,
                                       weight_transfer_backend="jaxrl_stream"))
    try:
        async def pushes(transport):
            async with VLLMClient(handle.url, "policy") as client:
                return [await push_state_dict(state, [client], version=v, transport=transport)
                        for v in range(1, repeats + 1)]

        results = {t: asyncio.run(pushes(t)) for t in ("reload", "stream")}
    finally:
        stop_server(handle)
    write_seconds = time_write_seconds(state, repeats)
    transports = {}
    for transport, runs in results.items():
        push_seconds = statistics.median(r.total_seconds for r in runs)
        transports[transport] = {"push_seconds": round(push_seconds, 5),
                                 "server_seconds": round(statistics.median(r.reload_seconds for r in runs), 5),
                                 "ratio_to_write": round(push_seconds / write_seconds, 2)}
    return {"arch": config.arch, "num_bytes": num_bytes, "repeats": repeats, "server_dtype": dtype,
            "write_shm_seconds": round(write_seconds, 5), "transports": transports}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="local HF checkpoint folder")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="vLLM server dtype")
    args = parser.parse_args(argv)
    print(json.dumps(run(args.model, args.repeats, args.dtype)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
