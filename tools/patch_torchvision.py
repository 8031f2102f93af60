#!/usr/bin/env python
"""Makes torchvision 0.28.0 importable on CPU-only machines. Run with the target venv's python.

Why: the only torchvision release pinned to torch 2.13.0 on PyPI is a CUDA build whose C++ ops fail
to load without CUDA; its `_meta_registrations.py` then registers fake kernels for
`torchvision::nms`/`qnms`, which do not exist, and the import dies with
"operator torchvision::nms does not exist". We guard those two decorators so they apply only when
the ops loaded (`torchvision.extension._has_ops()`). The pure-Python image transforms that the
Qwen-VL image/video processors use work unchanged. Idempotent; a no-op without torchvision.
"""
import importlib.util
import pathlib
import re
import sys

GUARD = "_jaxrl_vl_maybe_register_fake"
HELPER = f'''
import torchvision.extension as _jaxrl_vl_tv_ext


def {GUARD}(op_name):
    """Patched by jaxrl_vl tools/patch_torchvision.py: fake kernels only when the C++ ops loaded."""
    if _jaxrl_vl_tv_ext._has_ops():
        return torch.library.register_fake(op_name)
    return lambda fn: fn
'''


def patch(path: pathlib.Path) -> str:
    src = path.read_text()
    if GUARD in src:
        return "already patched"
    pattern = r'@torch\.library\.register_fake\("torchvision::(nms|qnms)"\)'
    src, count = re.subn(pattern, "@" + GUARD + r'("torchvision::\1")', src)
    if count != 2:
        raise SystemExit(f"torchvision patch: expected 2 register_fake(nms/qnms) decorators in {path}, found {count}")
    first_use = src.index("@" + GUARD)
    insert_at = src.rfind("\n\n", 0, first_use)
    path.write_text(src[:insert_at] + "\n" + HELPER + src[insert_at:])
    return "patched"


if __name__ == "__main__":
    spec = importlib.util.find_spec("torchvision")
    if spec is None:
        print("torchvision not installed: nothing to patch")
        sys.exit(0)
    meta = pathlib.Path(spec.origin).parent / "_meta_registrations.py"
    print(f"{meta}: {patch(meta)}")
