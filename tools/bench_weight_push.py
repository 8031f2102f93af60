#!/usr/bin/env python
"""Weight-push benchmark: push time per transport vs one safetensors write to /dev/shm.

    python tools/bench_weight_push.py --model DIR [--repeats 5] [--warmup 2] [--settle 0.5]

Starts a CPU vLLM server on the checkpoint and, in rounds, times (a) writing the checkpoint's own
params once to a fresh folder on /dev/shm with safetensors (the floor: one copy), (b) a push with the
`reload` transport (that write + vLLM reload), (c) a push with the `stream` transport (HTTP into our
vLLM plugin), (d) a push with the `shm` transport (copy into the server's shared-memory slot + one
commit; its first two pushes, which lay the slots out and touch both, fall in the warmup). Rounds
interleave the transports so that load from other processes hits them alike, and
each timed step starts after `--settle` seconds idle (on a 2-core machine the server's work right after
a push, e.g. freeing the old weights, otherwise lands in whatever is timed next: a write measured just
after a push took 4x longer); the first `--warmup` rounds are not counted. Prints JSON with the medians, the ratio push / write
(target: <= 2 for the `small` model) and each transport's median seconds per phase
(PushResult.phase_seconds: client-side checksum/send/write/commit, server-side stage/pause/load/version/resume,
server_handler = the commit route's own time, server_worker = the shm adoption in the worker). `reload_stock`/`stream_stock` are the same transports over
vLLM's own routes only (plugin_routes=False: what a server without our plugin gets), for comparison.
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
from jaxrl_vl.rollout.weight_push import TRANSPORTS, push_state_dict, write_weights  # noqa: E402


def time_write_seconds(state: dict) -> float:
    folder = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="jaxrl_vl_bench_"))
    try:
        return write_weights(state, folder)[1]
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _median_phases(runs) -> dict:
    phases = sorted({phase for r in runs for phase in r.phase_seconds})
    return {p: round(statistics.median(r.phase_seconds.get(p, 0.0) for r in runs), 5) for p in phases}


def run(model_dir: str, repeats: int, warmup: int, dtype: str, settle_seconds: float) -> dict:
    from jaxrl_vl.models import load, to_hf_state_dict

    config, params = load(model_dir)
    state = to_hf_state_dict(params, config)
    num_bytes = sum(v.nbytes for v in state.values())
    handle = start_server(ServerConfig(model=model_dir, served_model_name="policy", dtype=dtype,
                                       weight_transfer_backend="jaxrl_stream", shm_weights=True))
    variants = {**{t: (t, True) for t in TRANSPORTS},
                **{f"{t}_stock": (t, False) for t in TRANSPORTS if t != "shm"}}  # shm has no stock fallback
    writes, pushes = [], {name: [] for name in variants}
    try:
        async def rounds():
            async with VLLMClient(handle.url, "policy") as client:
                for round_index in range(warmup + repeats):
                    await asyncio.sleep(settle_seconds)
                    write_seconds = time_write_seconds(state)
                    results = {}
                    for name, (transport, plugin_routes) in variants.items():
                        await asyncio.sleep(settle_seconds)
                        results[name] = await push_state_dict(state, [client], version=round_index,
                                                              transport=transport, plugin_routes=plugin_routes)
                    if round_index >= warmup:
                        writes.append(write_seconds)
                        for name, result in results.items():
                            pushes[name].append(result)

        asyncio.run(rounds())
    finally:
        stop_server(handle)
    write_seconds = statistics.median(writes)
    transports = {}
    for name, runs in pushes.items():
        push_seconds = statistics.median(r.total_seconds for r in runs)
        transports[name] = {"push_seconds": round(push_seconds, 5),
                                 "ratio_to_write": round(push_seconds / write_seconds, 2),
                                 "trainer_write_seconds": round(statistics.median(r.write_seconds for r in runs), 5),
                                 "phases": _median_phases(runs)}
    return {"arch": config.arch, "num_bytes": num_bytes, "repeats": repeats, "warmup": warmup,
            "settle_seconds": settle_seconds, "server_dtype": dtype, "write_shm_seconds": round(write_seconds, 5), "transports": transports}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="local HF checkpoint folder")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--settle", type=float, default=0.5, help="idle seconds before each timed step")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="vLLM server dtype")
    args = parser.parse_args(argv)
    print(json.dumps(run(args.model, args.repeats, args.warmup, args.dtype, args.settle)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
