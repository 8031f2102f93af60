"""Engine-core side of the one-request weight push: a weight load on an idle engine in ONE round trip.

Why: every call from the API server into the engine core (a ZMQ utility call) costs 0.4-0.8 ms on a small
CPU host, and the usual commit makes four of them (pause, the worker's load, version, resume), about a
quarter of an `shm` push of the small model. When the engine has nothing to schedule, a utility call
already runs between engine steps, so the load needs no pause: `jaxrl_load_idle` does the worker's load,
drops what the old weights computed (prefix KV cache, vision encoder cache) and sets the version, in the
engine-core process, in one call. The multimodal input caches hold preprocessed pixels, which do not
depend on the weights: both sides of them (API server and engine) are kept, so they stay in sync.
With requests running or queued, or the scheduler paused by someone else, it does nothing and says so;
routes.py then pauses as usual (pause_mode decides what happens to the running requests).

`register()` (__init__.py, run by vLLM in every process) adds the method to vLLM's EngineCore class;
the engine core looks utility methods up by name (EngineCoreProc._handle_client_request).
"""
from typing import Any

METHOD = "jaxrl_load_idle"


def jaxrl_load_idle(self, worker_method: str, kwargs: dict[str, Any], version: str) -> dict[str, Any]:
    """`self`: vLLM's EngineCore. Returns {"loaded": False} untouched when the engine is busy or paused,
    else {"loaded": True, "result": the worker method's result}. A failing load raises before the
    caches or the version change."""
    if self.has_work() or self.is_scheduler_paused():
        return {"loaded": False}
    result = self.collective_rpc(worker_method, kwargs=kwargs)[0]
    if not self.reset_prefix_cache(reset_running_requests=True, reset_connector=True):
        raise RuntimeError("weights loaded, but the KV connector cache could not be reset")
    self.reset_encoder_cache()
    self.set_weight_version(version)
    return {"loaded": True, "result": result}


def install() -> None:
    from vllm.v1.engine.core import EngineCore

    if not hasattr(EngineCore, METHOD):
        setattr(EngineCore, METHOD, jaxrl_load_idle)
