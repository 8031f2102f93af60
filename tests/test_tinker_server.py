"""The Tinker-compatible server driven by the real `tinker==0.38.0` SDK over loopback HTTP.

One server (uvicorn in a thread) on the tiny qwen3_vl checkpoint serves the whole module. Tests marked
`vllm` attach a real CPU vLLM sampler (LoRA enabled) to it.
"""
from __future__ import annotations

import io
import os

import httpx
import numpy as np
import pytest

os.environ.setdefault("TINKER_TELEMETRY", "0")
tinker = pytest.importorskip("tinker")
from tinker import types  # noqa: E402

from jaxrl_vl.rollout.server import free_loopback_port, stop_server  # noqa: E402
from jaxrl_vl.tinker.runner import ServerThread, build_service, start_vllm_for  # noqa: E402
from jaxrl_vl.tinker.sampling import VLLMSampler  # noqa: E402

API_KEY = "tml-test-key"


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    service = build_service(tiny_model_dir, str(tmp_path_factory.mktemp("tinker_store")), vllm_url=None,
                            poll_seconds=2.0)
    thread = ServerThread(service, free_loopback_port(), api_key=API_KEY).start()
    yield thread, service
    thread.stop()
    service.close()


@pytest.fixture(scope="module")
def sampler(server, tiny_model_dir, tmp_path_factory):
    """Attaches a LoRA-enabled CPU vLLM server (served name "base") on the tiny checkpoint to the module's
    tinker server; TINKER_TEST_VLLM_URL reuses one that is already running."""
    url = os.environ.get("TINKER_TEST_VLLM_URL")
    handle = None if url else start_vllm_for(tiny_model_dir, max_model_len=2048, kv_cache_gib=1,
                                             log_dir=str(tmp_path_factory.mktemp("vllm_logs")))
    _, service = server
    service.sampler = VLLMSampler(url or handle.url, "base")
    yield service.sampler
    service.sampler = None
    if handle is not None:
        stop_server(handle)


@pytest.fixture(scope="module")
def client(server):
    thread, _ = server
    return tinker.ServiceClient(base_url=thread.url, api_key=API_KEY)


def _png(width: int, height: int, seed: int) -> bytes:
    from PIL import Image
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _image_tokens(model_dir: str, width: int, height: int) -> int:
    from transformers import AutoImageProcessor
    processor = AutoImageProcessor.from_pretrained(model_dir)
    return processor.get_number_of_image_patches(height, width, {}) // processor.merge_size ** 2


def _image_datum(model_dir: str, expected_tokens: int | None = None, seed: int = 0,
                 size: tuple[int, int] = (64, 48)) -> types.Datum:
    """<text> <image> <text>, loss on the last text tokens only (image positions: target 0, weight 0)."""
    n_image = _image_tokens(model_dir, *size)
    image = types.ImageChunk(data=_png(*size, seed), format="png",
                             expected_tokens=n_image if expected_tokens is None else expected_tokens)
    before, after = [11, 12, 13], [21, 22, 23, 24, 25]
    model_input = types.ModelInput(chunks=[types.EncodedTextChunk(tokens=before), image,
                                           types.EncodedTextChunk(tokens=after)])
    n = len(before) + n_image + len(after)
    targets = np.zeros(n, np.int64)
    targets[-len(after):-1] = after[1:]
    targets[-1] = 30
    weights = np.zeros(n, np.float32)
    weights[-len(after):] = 1.0
    return types.Datum(model_input=model_input, loss_fn_inputs={"target_tokens": targets, "weights": weights})


def _floats(values) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], np.float64)


def _text_datum(tokens: list[int]) -> types.Datum:
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": np.asarray(tokens[1:], np.int64),
                                       "weights": np.ones(len(tokens) - 1, np.float32)})


def test_training_with_images_save_and_load(client, tiny_model_dir):
    tc = client.create_lora_training_client(base_model=tiny_model_dir, rank=4).result()
    assert tc.get_info().model_data.tokenizer_id
    datum = _image_datum(tiny_model_dir)
    losses = []
    for _ in range(4):
        out = tc.forward_backward([datum, _text_datum(list(range(40, 60)))], "cross_entropy").result()
        losses.append(out.metrics["loss:sum"])
        lp = out.loss_fn_outputs[0]["logprobs"].to_numpy()
        assert lp.shape == (datum.model_input.length,) and np.isfinite(lp).all()
        tc.optim_step(types.AdamParams(learning_rate=5e-3)).result()
    assert losses[-1] < losses[0] * 0.8, losses

    # forward-only gives the same logprobs as the model we train; loss:sum is the weighted NLL sum
    fwd = tc.forward([datum], "cross_entropy").result()
    lp = fwd.loss_fn_outputs[0]["logprobs"].to_numpy()
    w = datum.loss_fn_inputs["weights"].to_numpy()
    assert fwd.metrics["loss:sum"] == pytest.approx(float(-(lp * w).sum()), rel=1e-4)

    saved = tc.save_state("ckpt1").result().path
    assert saved.endswith("/weights/ckpt1")
    for with_optimizer in (True, False):
        loader = (client.create_training_client_from_state_with_optimizer if with_optimizer
                  else client.create_training_client_from_state)
        tc2 = loader(saved).result()
        lp2 = tc2.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
        np.testing.assert_allclose(lp2, lp, atol=1e-5)
    # legacy form: load into the existing client
    tc.load_state(saved).result()


@pytest.mark.slow
@pytest.mark.parametrize("loss_fn", ["importance_sampling", "ppo", "cispo", "dro"])
def test_rl_losses(client, tiny_model_dir, loss_fn):
    tc = client.create_lora_training_client(base_model=tiny_model_dir, rank=4).result()
    tokens = list(range(40, 52))
    n = len(tokens) - 1
    fwd = tc.forward([_text_datum(tokens)], "cross_entropy").result()
    sampler_lp = fwd.loss_fn_outputs[0]["logprobs"].to_numpy()
    advantages = np.linspace(-1, 1, n).astype(np.float32)
    datum = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                        loss_fn_inputs={"target_tokens": np.asarray(tokens[1:], np.int64),
                                        "logprobs": sampler_lp, "advantages": advantages})
    out = tc.forward_backward([datum], loss_fn).result()
    loss = out.metrics["loss:sum"]
    assert np.isfinite(loss)
    if loss_fn in ("importance_sampling", "ppo"):  # ratio 1 at the sampler's own logprobs: -sum(A)
        assert loss == pytest.approx(-float(advantages.sum()), abs=1e-4)
    assert np.isfinite(tc.optim_step(types.AdamParams(learning_rate=1e-3)).result().metrics["grad_norm:mean"])


def test_images_of_different_sizes_score_as_when_alone(client, tiny_model_dir):
    """Different-size images in one batch share vision slots (models.vision_inputs packs them, with a
    segment mask); each datum still scores exactly as in a batch of its own."""
    tc = client.create_lora_training_client(base_model=tiny_model_dir, rank=4).result()
    data = [_image_datum(tiny_model_dir, seed=1, size=(64, 48)), _image_datum(tiny_model_dir, seed=2, size=(96, 64)),
            _image_datum(tiny_model_dir, seed=3, size=(32, 32))]
    together = tc.forward(data, "cross_entropy").result().loss_fn_outputs
    for datum, out in zip(data, together):
        alone = tc.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
        np.testing.assert_allclose(out["logprobs"].to_numpy(), alone, atol=1e-5)


def test_errors_keep_the_server_serving(client, server, tiny_model_dir):
    thread, _ = server
    tc = client.create_lora_training_client(base_model=tiny_model_dir, rank=4).result()
    with pytest.raises(tinker.RequestFailedError, match=r"expands to \d+ image tokens.*expected_tokens=3"):
        tc.forward_backward([_image_datum(tiny_model_dir, expected_tokens=3)], "cross_entropy").result()
    with pytest.raises(tinker.RequestFailedError, match="stable_reinforce.*not supported"):
        tc.forward_backward([_text_datum([1, 2, 3, 4])], "stable_reinforce").result()

    headers = {"X-API-Key": API_KEY, "Content-Type": "application/x-protobuf"}
    bad = httpx.post(f"{thread.url}/api/v1/forward_backward", content=b"\xff\x00garbage", headers=headers)
    assert bad.status_code == 400 and "ForwardBackwardRequest protobuf" in bad.json()["detail"]
    from tinker.proto import tinker_public_pb2 as pb
    unknown = pb.ForwardBackwardRequest(model_id="sess-nope:train:9", seq_id=1, loss_fn="cross_entropy")
    response = httpx.post(f"{thread.url}/api/v1/forward_backward", content=unknown.SerializeToString(),
                          headers=headers)
    assert response.status_code == 404 and "sess-nope:train:9" in response.json()["detail"]
    with pytest.raises(tinker.NotFoundError):
        client.create_sampling_client(model_path="tinker://sess-nope:train:0/sampler_weights/x").result().sample(
            types.ModelInput.from_ints([1, 2]), 1, types.SamplingParams(max_tokens=2)).result()
    escape = httpx.delete(f"{thread.url}/api/v1/training_runs/x/checkpoints/weights/..%2F..%2Fetc",
                          headers=headers)
    assert escape.status_code in (400, 404)

    # the server still trains after all of the above, also on text that holds the <|image_pad|> id (a policy
    # may sample it): that is text, not an image
    image_pad = server[1].backend.config.image_token_id
    out = tc.forward_backward([_text_datum([5, image_pad, 7, 8, 9])], "cross_entropy").result()
    assert np.isfinite(out.metrics["loss:sum"])


def test_api_key_is_required(server):
    thread, _ = server
    response = httpx.post(f"{thread.url}/api/v1/create_session", json={})
    assert response.status_code == 401 and "API key" in response.json()["detail"]
    wrong = httpx.post(f"{thread.url}/api/v1/create_session", json={}, headers={"X-API-Key": "tml-wrong"})
    assert wrong.status_code == 401
    with pytest.raises(tinker.AuthenticationError):
        tinker.ServiceClient(base_url=thread.url, api_key="tml-wrong").get_server_capabilities()


@pytest.mark.vllm
@pytest.mark.slow
def test_full_flow_with_images_and_sampling(client, server, sampler, tiny_model_dir):
    tc = client.create_lora_training_client(base_model=tiny_model_dir, rank=4).result()
    datum = _image_datum(tiny_model_dir, seed=3)
    for _ in range(2):
        tc.forward_backward([datum], "cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    trained = tc.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()

    sampling_client = tc.save_weights_and_get_sampling_client().result()
    prompt = datum.model_input
    result = sampling_client.sample(prompt, 3, types.SamplingParams(max_tokens=6, temperature=1.0, seed=1)).result()
    assert len(result.sequences) == 3
    for seq in result.sequences:
        assert 1 <= len(seq.tokens) <= 6 and len(seq.logprobs) == len(seq.tokens)
        assert seq.stop_reason in ("stop", "length")
    # vLLM (trained adapter) logprobs of the sampled tokens == the JAX trainer's on prompt + sample
    sampled = result.sequences[0]
    continued = prompt.append(types.EncodedTextChunk(tokens=list(sampled.tokens[:-1])))
    targets = np.zeros(continued.length, np.int64)
    targets[prompt.length - 1:] = sampled.tokens
    check = types.Datum(model_input=continued, loss_fn_inputs={"target_tokens": targets,
                                                               "weights": np.zeros(continued.length, np.float32)})
    jax_lp = tc.forward([check], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
    np.testing.assert_allclose(jax_lp[prompt.length - 1:], sampled.logprobs, atol=2e-3)

    # prompt logprobs (compute_logprobs) with the sampler weights == the trainer's forward pass
    prompt_lp = _floats(sampling_client.compute_logprobs(prompt).result())
    assert len(prompt_lp) == prompt.length and np.isnan(prompt_lp[0])
    text_targets = datum.loss_fn_inputs["target_tokens"].to_numpy()
    ids = np.concatenate([c.tokens if hasattr(c, "tokens") else np.full(c.expected_tokens, -1) for c in prompt.chunks])
    # trainer logprob at t scores target[t] = token t+1; compare where both are text tokens
    positions = [t for t in range(len(ids) - 1) if ids[t + 1] >= 0 and text_targets[t] == ids[t + 1]]
    assert positions
    np.testing.assert_allclose(prompt_lp[[t + 1 for t in positions]], trained[positions], atol=1e-4)

    # named sampler checkpoint, sampling via model_path, and a base-model sampling client
    path = tc.save_weights_for_sampler("final").result().path
    server[1].backend._sampler_loras.clear()  # prompt logprobs must then read the PEFT folder back
    by_path = client.create_sampling_client(model_path=path).result()
    greedy = by_path.sample(prompt, 1, types.SamplingParams(max_tokens=4, temperature=0.0)).result()
    assert len(greedy.sequences[0].tokens) >= 1
    base = client.create_sampling_client(base_model=tiny_model_dir).result()
    base_lp = _floats(base.compute_logprobs(prompt).result())
    assert np.nanmax(np.abs(base_lp - prompt_lp)) > 1e-4  # the adapter changed the model
    by_path_lp = _floats(by_path.compute_logprobs(prompt).result())
    np.testing.assert_allclose(by_path_lp, prompt_lp, atol=1e-5)
    rest = tinker.RestClient(base_url=server[0].url, api_key=API_KEY)
    run = rest.get_training_run(tc.model_id).result()
    assert run.last_sampler_checkpoint is not None
