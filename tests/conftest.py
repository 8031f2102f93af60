"""Session fixtures shared by the test suite.

- `tiny_model_dirs`: {"qwen3_vl": dir, "qwen2_5_vl": dir}, tiny random checkpoints built by
  jaxrl_vl/models/tiny_checkpoint.py (tools/make_tiny_model.py) into a cache folder keyed by the builder's source hash (built once,
  a few seconds; later sessions reuse them). Treat them as read-only.
- `tiny_model_dir`: the qwen3_vl one. `small_model_dirs`: the same for `--size small`.
- `vllm_server`: a real CPU vLLM server (jaxrl_vl.rollout.server) on the qwen3_vl tiny
  checkpoint, one per session; tests that use it are marked `@pytest.mark.vllm`.
  Needs .venv-vllm (`make install-vllm`).
"""
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL_CACHE = Path(os.environ.get("JAXRL_VL_CACHE", Path.home() / ".cache" / "jaxrl_vl")) / "tiny_models"


def tiny_model_path(arch: str, size: str = "tiny") -> Path:
    """Builds (once per builder version) and returns the checkpoint folder for arch/size."""
    from jaxrl_vl.models import tiny_checkpoint

    digest = hashlib.sha256()
    for source in tiny_checkpoint.SOURCES:
        digest.update(source.name.encode() + source.read_bytes())
    folder = TINY_MODEL_CACHE / digest.hexdigest()[:16] / f"{arch}-{size}"
    if not (folder / "model.safetensors").exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{arch}-{size}-"))
        tiny_checkpoint.build(staging, arch=arch, size=size)
        try:
            staging.rename(folder)  # atomic: concurrent sessions never see a half-written folder
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)  # another session finished first
    return folder


@pytest.fixture(scope="session")
def tiny_model_dirs() -> dict[str, str]:
    return {arch: str(tiny_model_path(arch)) for arch in ("qwen3_vl", "qwen2_5_vl")}


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_model_dirs) -> str:
    return tiny_model_dirs["qwen3_vl"]


@pytest.fixture(scope="session")
def small_model_dirs() -> dict[str, str]:
    """The `small` (about 6 M params) checkpoints, for tests that must see learning."""
    return {arch: str(tiny_model_path(arch, "small")) for arch in ("qwen3_vl", "qwen2_5_vl")}


@pytest.fixture(scope="session")
def vllm_server(tiny_model_dir, tmp_path_factory):
    """A running CPU vLLM server (float32, eager, 2048 context, 1 GiB KV cache, all three weight-push
    transports) on the qwen3_vl tiny checkpoint; yields its ServerHandle, stopped at session end."""
    from jaxrl_vl.rollout.server import ServerConfig, start_server, stop_server

    config = ServerConfig(model=tiny_model_dir, served_model_name="tiny", dtype="float32", max_model_len=2048,
                          cpu_kv_cache_gib=1, enforce_eager=True, seed=0, weight_transfer_backend="jaxrl_stream",
                          shm_weights=True,
                          log_dir=str(tmp_path_factory.mktemp("vllm_logs")))
    handle = start_server(config)
    try:
        yield handle
    finally:
        stop_server(handle)
