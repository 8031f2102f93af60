"""vLLM general plugin: registers the `jaxrl_stream` weight-transfer backend and the engine core's
one-round-trip weight load (engine_core.py).

Installed into the vLLM environment by tools/install_vllm.sh; vLLM calls `register()` in every
process (API server, engine core, workers) through the `vllm.general_plugins` entry point. Serve
with `--weight-transfer-config '{"backend": "jaxrl_stream"}'` (jaxrl_vl.rollout.server does when
ServerConfig.weight_transfer_backend is set). The package also ships an endpoint plugin
(`routes.py`, entry point `vllm.endpoint_plugins`: one-request weight pushes for every transport) and
the `shm` transport's worker extension (`shm_worker.py`, `--worker-extension-cls`).
"""
BACKEND_NAME = "jaxrl_stream"


def register() -> None:
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    from jaxrl_vl_vllm_plugin import engine_core

    engine_core.install()

    if BACKEND_NAME not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(BACKEND_NAME, "jaxrl_vl_vllm_plugin.engine",
                                                    "StreamWeightTransferEngine")
