"""A Tinker-compatible training + sampling server (SDK tinker==0.38.0) on the JAX trainer and vLLM.

    python launch/tinker_server.py --base-model DIR_OR_HUB_ID [--port 8000] [--api-key tml-...]

Then point Tinker recipes at it: `TINKER_API_KEY=tml-... python -m recipe base_url=http://localhost:8000`.
Binds 127.0.0.1 only. Sampling starts a LoRA-enabled vLLM server on the same checkpoint (from
.venv-vllm) unless --vllm-url attaches to a running one (it must have --enable-lora) or --no-vllm.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-model", required=True, help="local HF checkpoint folder or hub id")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=os.environ.get("TINKER_SERVER_API_KEY"),
                        help="require this X-API-Key on every request (401 otherwise)")
    parser.add_argument("--storage-root", default=os.path.join(tempfile.gettempdir(), "jaxrl_vl_tinker"),
                        help="where tinker:// checkpoints are written")
    parser.add_argument("--vllm-url", default=None, help="attach to a running LoRA-enabled vLLM server")
    parser.add_argument("--no-vllm", action="store_true", help="training only (asample fails with a clear error)")
    parser.add_argument("--vllm-device", default="cpu", choices=("cpu", "gpu"))
    parser.add_argument("--max-model-len", type=int, default=4096, help="sampler context length")
    parser.add_argument("--max-lora-rank", type=int, default=64)
    parser.add_argument("--poll-seconds", type=float, default=25.0, help="retrieve_future long-poll window")
    parser.add_argument("--max-body-bytes", type=_positive_int, default=None,
                        help="largest request body accepted (HTTP 413 above it); default 256 MiB")
    return parser.parse_args(argv)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be a positive number of bytes")
    return value


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    import uvicorn

    from jaxrl_vl.models.checkpoint import _resolve_dir
    from jaxrl_vl.xla_flags import apply_defaults
    apply_defaults()  # before the trainer's first JAX computation
    from jaxrl_vl.tinker.app import DEFAULT_MAX_BODY_BYTES, create_app
    from jaxrl_vl.tinker.runner import OwnedVLLM, build_service, start_vllm_for

    vllm = None
    if not args.no_vllm and args.vllm_url is None:
        # ours: restarted automatically if its engine dies (e.g. an OOM-killed worker)
        vllm = OwnedVLLM(start_vllm_for(_resolve_dir(args.base_model), max_model_len=args.max_model_len,
                                        max_lora_rank=args.max_lora_rank, device=args.vllm_device))
        logging.info("vLLM sampler at %s (log %s)", vllm.handle.url, vllm.handle.log_path)
    # uvicorn re-raises the SIGTERM it caught after its graceful shutdown; with the default handler that
    # would end the process before `finally` stops vLLM, so make SIGTERM an ordinary exit.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        service = build_service(args.base_model, args.storage_root,
                                vllm_url=None if args.no_vllm else args.vllm_url, owned_vllm=vllm,
                                poll_seconds=args.poll_seconds, max_context_length=args.max_model_len)
        app = create_app(service, api_key=args.api_key, max_body_bytes=args.max_body_bytes or DEFAULT_MAX_BODY_BYTES)
        uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="info")
    finally:
        if vllm is not None:
            vllm.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
