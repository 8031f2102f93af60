"""A Tinker-compatible server (SDK `tinker==0.38.0`) on the JAX trainer, with vLLM for sampling.

    python launch/tinker_server.py --base-model DIR_OR_HUB_ID [--port 8000] [--api-key tml-...]
    TINKER_API_KEY=tml-... python -m tinker_cookbook.recipes.<recipe> base_url=http://127.0.0.1:8000 \
        model_name=DIR_OR_HUB_ID renderer_name=qwen3_vl ...

Modules (one concern each):
  protocol.py  protobuf/JSON wire formats (ForwardBackwardRequest in; ForwardBackwardOutput and
               SampleResponse out), UserError / NotFoundError
  futures.py   request ids, long-poll retrieve_future, seq_id ordering per model, retry dedup
  sessions.py  sessions and sampling sessions (ids the SDK expects)
  images.py    image chunks -> <|image_pad|> tokens + pixels via the checkpoint's processor
  backend.py   training clients as LoRA adapters on one base model (AdamW each), fwd/bwd, losses,
               checkpoints, prompt logprobs
  sampling.py  vLLM sampling from saved sampler weights (PEFT adapters, one folder per version)
  storage.py   tinker:// checkpoint paths under a storage root (escapes rejected)
  service.py   glues the above; app.py the FastAPI routes; runner.py build/start helpers
"""
