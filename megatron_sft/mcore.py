"""The one place that imports Megatron-Core.

``import megatron.core`` pulls in an MoE module that needs triton (a 1 GB CUDA compiler) only to
define two kernels we never call. Where triton is absent (CPU machines, CI) we register a stub
for that single module before the import; with triton installed nothing is changed.
"""

from __future__ import annotations

import importlib.util
import sys
import types
import warnings

_STUBBED_MODULE = "megatron.core.transformer.moe.ops.paged_stash"


def _kernel_unavailable(*args, **kwargs):
    raise RuntimeError("paged-stash MoE kernels need triton, which is not installed")


def _install_triton_stub() -> None:
    if importlib.util.find_spec("triton") is not None or _STUBBED_MODULE in sys.modules:
        return
    stub = types.ModuleType(_STUBBED_MODULE)
    stub.GLOBAL_BLOCK_SIZE = 1024
    stub.paged_stash_copy_kernel = _kernel_unavailable
    stub.paged_stash_pop_kernel = _kernel_unavailable
    stub.__all__ = ["GLOBAL_BLOCK_SIZE", "paged_stash_copy_kernel", "paged_stash_pop_kernel"]
    sys.modules[_STUBBED_MODULE] = stub


_install_triton_stub()

with warnings.catch_warnings():
    # Without TE/Apex, Megatron-Core warns four times that it falls back to torch kernels; the
    # attention backend choice (model/spec.py) is where that matters and is logged.
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    import megatron.core  # noqa: E402  (must follow the stub)

MCORE_VERSION = getattr(megatron.core, "__version__", "unknown")
