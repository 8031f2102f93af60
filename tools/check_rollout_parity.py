#!/usr/bin/env python
"""Rollout parity: what vLLM samples after a weight push is what the JAX model scores.

    python tools/check_rollout_parity.py --model DIR [--transport reload|stream|shm] [--dtype float32|bfloat16]

Starts a CPU vLLM server on the checkpoint, takes one optimizer step (Adam, next-token loss on a
rendered prompt) on the JAX params, pushes them (weight_version 1), samples with logprobs on
prompts with images of different sizes, scores the same tokens in JAX from the rendered pixels
(decoded uint8 -> normalised host-side; never re-processed), and prints as its last line JSON with
max_abs_logprob_diff, mean_abs_logprob_diff, tokens, weight_version, push_seconds.
fp32 target: max <= 1e-4. With --dtype bfloat16 the server runs bf16 (JAX scores in fp32) and the
means are what to report.
"""
import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxrl_vl.rollout.client import VLLMClient, sampled_logprobs, weight_versions  # noqa: E402
from jaxrl_vl.rollout.messages import to_openai_messages  # noqa: E402
from jaxrl_vl.rollout.mm_decode import decode_images, normalize_pixels  # noqa: E402
from jaxrl_vl.rollout.server import ServerConfig, start_server, stop_server  # noqa: E402
from jaxrl_vl.rollout.weight_push import TRANSPORTS, push_params  # noqa: E402


def _prompts(rng: np.random.Generator) -> list[list[dict]]:
    """Three conversations: one image, two images of different sizes, and text only."""
    def image(h, w):
        from PIL import Image

        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))

    return [
        [{"role": "user", "content": [{"type": "image", "image": image(96, 128)},
                                      {"type": "text", "text": "Where is the agent? Answer <action>left</action>."}]}],
        [{"role": "system", "content": "You compare pictures."},
         {"role": "user", "content": [{"type": "text", "text": "First:"}, {"type": "image", "image": image(64, 64)},
                                      {"type": "text", "text": "Second:"}, {"type": "image", "image": image(120, 80)}]}],
        [{"role": "user", "content": "What is 6 * 7?"}],
    ]


def _row(rendered: dict, sampled: list[int], mean, std) -> dict:
    pixels, grid = decode_images(rendered.get("features"))
    row = {"input_ids": np.asarray(rendered["token_ids"] + sampled, np.int32)}
    if len(grid):
        row["pixel_values"] = normalize_pixels(pixels, mean, std)
        row["image_grid_thw"] = grid
    return row


def _optimizer_step(params, config, row):
    """One Adam step (lr 1e-3) on next-token cross-entropy of `row`: moves every weight."""
    import jax
    import jax.numpy as jnp
    import optax

    from jaxrl_vl.models import apply, make_batch

    batch = {k: jnp.asarray(v) for k, v in make_batch([row], config).items()}

    def loss_fn(p):
        logits = apply(p, batch, config)[0, :-1]
        targets = batch["input_ids"][0, 1:]
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[:, None], -1))

    optimizer = optax.adam(1e-3)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    return optax.apply_updates(params, updates), float(loss)


def _jax_sampled_logprobs(params, config, rows, num_sampled):
    import jax
    import jax.numpy as jnp

    from jaxrl_vl.models import apply, make_batch

    batch = {k: jnp.asarray(v) for k, v in make_batch(rows, config).items()}
    logprobs = jax.nn.log_softmax(apply(params, batch, config), axis=-1)
    out = []
    for b, (row, n) in enumerate(zip(rows, num_sampled)):
        ids = row["input_ids"]
        positions = np.arange(len(ids) - n - 1, len(ids) - 1)
        out.append(np.asarray(logprobs[b, positions, ids[len(ids) - n:]]))
    return out


async def _rollouts(client, prompts, seed, max_tokens, forbidden_ids):
    rendered = [await client.render(to_openai_messages(p)) for p in prompts]
    # A sampled <|image_pad|> would be read as an image slot when scored; forbid the vision tokens
    # (vLLM reports raw logprobs, before the bias).
    sampling = {"temperature": 1.0, "top_p": 1.0, "max_tokens": max_tokens, "logprobs": 0, "ignore_eos": True,
                "logit_bias": {str(i): -100.0 for i in forbidden_ids}}
    responses = await asyncio.gather(*[client.generate(r, dict(sampling, seed=seed + i)) for i, r in enumerate(rendered)])
    return rendered, [r["choices"][0] for r in responses]


def run(model_dir: str, transport: str = "reload", dtype: str = "float32", seed: int = 0, max_tokens: int = 16) -> dict:
    from jaxrl_vl.models import load

    config, params = load(model_dir)
    processor_config = json.loads((Path(model_dir) / "preprocessor_config.json").read_text())
    mean, std = processor_config["image_mean"], processor_config["image_std"]
    prompts = _prompts(np.random.default_rng(seed))
    forbidden = [config.image_token_id, config.video_token_id, config.vision_start_token_id,
                 config.vision_end_token_id]
    handle = start_server(ServerConfig(model=model_dir, served_model_name="policy", dtype=dtype, seed=seed,
                                       weight_transfer_backend="jaxrl_stream" if transport == "stream" else None,
                                       shm_weights=transport == "shm"))
    try:
        async def main():
            async with VLLMClient(handle.url, "policy") as client:
                rendered, _ = await _rollouts(client, prompts[:1], seed, 1, forbidden)
                new_params, loss = _optimizer_step(params, config, _row(rendered[0], [], mean, std))
                push = await push_params(new_params, config, [client], version=1, transport=transport)
                rendered, choices = await _rollouts(client, prompts, seed, max_tokens, forbidden)
                return new_params, loss, push, rendered, choices

        new_params, loss, push, rendered, choices = asyncio.run(main())
    finally:
        stop_server(handle)
    rows = [_row(r, c["token_ids"], mean, std) for r, c in zip(rendered, choices)]
    ours = _jax_sampled_logprobs(new_params, config, rows, [len(c["token_ids"]) for c in choices])
    diffs = np.concatenate([np.abs(np.asarray(sampled_logprobs(c)) - o) for c, o in zip(choices, ours)])
    versions = sorted({v for c in choices for v in weight_versions(c)})
    return {"max_abs_logprob_diff": float(diffs.max()), "mean_abs_logprob_diff": float(diffs.mean()),
            "tokens": int(diffs.size), "weight_version": versions[0] if len(versions) == 1 else versions,
            "push_seconds": round(push.total_seconds, 4), "push_write_seconds": round(push.write_seconds, 4),
            "push_reload_seconds": round(push.reload_seconds, 4), "train_loss": loss, "transport": transport,
            "dtype": dtype, "arch": config.arch, "num_images": int(sum(len(r["features"]["kwargs_data"]["image"])
                                                                     for r in rendered if r.get("features")))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="local HF checkpoint folder (Qwen3-VL or Qwen2.5-VL)")
    parser.add_argument("--transport", default="reload", choices=list(TRANSPORTS))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="vLLM server dtype")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--tolerance", type=float, default=1e-4, help="fp32 pass bound on max_abs_logprob_diff")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    result = run(args.model, args.transport, args.dtype, args.seed, args.max_tokens)
    result["seconds"] = round(time.perf_counter() - start, 1)
    result["ok"] = args.dtype != "float32" or (result["max_abs_logprob_diff"] <= args.tolerance
                                               and result["weight_version"] == "1")
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
