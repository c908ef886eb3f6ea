"""The one place that imports Megatron-Core.

``import megatron.core`` pulls in an MoE module that needs triton (a 1 GB CUDA compiler) only to
define two kernels we never call. Where triton is absent (CPU machines, CI) we register a stub
for that single module before the import; with triton installed nothing is changed.

Megatron-Core, Apex/TE fallbacks and torch.distributed.checkpoint print notices that a user of
this package cannot act on (``GPTModel IS DEPRECATED``: we stay on GPTModel on purpose, see
DESIGN.md; "Apex is not installed": we choose the norm and attention ourselves in model/spec.py).
``install_notice_filter`` (run at this import) turns each of them into a single DEBUG line of
the ``megatron_sft`` logger; every other warning is shown as before.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import sys
import types
import warnings

_STUBBED_MODULE = "megatron.core.transformer.moe.ops.paged_stash"
logger = logging.getLogger("megatron_sft")

# Notices hidden from stderr (regex, matched at the start of the message). Each says why.
NOTICE_PATTERNS = [
    r"Transformer Engine and Apex are not installed",  # import-time fallback to torch kernels
    r"Apex is not installed\. Falling back to Torch Norm",  # our specs pick the norm
    r"GPTModel IS DEPRECATED",  # HybridModel migration; GPTModel is the proven THD/CP path
    r"full scope is deprecated",  # TransformerConfig's own default cuda_graph_modules
    r"\w+ is experimental and still under active development",  # MIMO modules we never use
    r"MCore's async save is deprecated",  # we save synchronously
    r"torch\.distributed is disabled, unavailable or uninitialized",  # DCP reading common state
    r"The argument order of load has been changed",  # Megatron's call into torch DCP
]
# Megatron-Core loggers that emit the notices above through ``logging`` rather than ``warnings``
# (a filter must sit on the emitting logger: parents' filters do not see children's records).
NOTICE_LOGGERS = [
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.dist_checkpointing.strategies.torch",
]
# A performance hint for async TP all-reduce on GPUs; meaningless without CUDA.
_CPU_ONLY_NOTICES = [r"When using async grad allreduce it is recommended to set the environment variable "
                     r"CUDA_DEVICE_MAX_CONNECTIONS"]

_notice_re: re.Pattern | None = None
_seen_notices: set = set()


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


def is_notice(message: str) -> bool:
    """True for a third-party notice that ``install_notice_filter`` hides."""
    return _notice_re is not None and _notice_re.match(message) is not None


def _log_notice_once(message: str) -> None:
    first_line = message.strip().splitlines()[0] if message.strip() else message
    if first_line not in _seen_notices:
        _seen_notices.add(first_line)
        logger.debug("third-party notice (hidden): %s", first_line)


class _NoticeFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if is_notice(message):
            _log_notice_once(message)
            return False
        return True


def install_notice_filter(cuda_available: bool) -> None:
    """Route the notices of ``NOTICE_PATTERNS`` to one DEBUG line each; idempotent."""
    global _notice_re
    if _notice_re is not None:
        return
    patterns = NOTICE_PATTERNS + ([] if cuda_available else _CPU_ONLY_NOTICES)
    _notice_re = re.compile("|".join(f"(?:{p})" for p in patterns))
    show = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if is_notice(str(message)):
            _log_notice_once(str(message))
        else:
            show(message, category, filename, lineno, file, line)

    warnings.showwarning = showwarning
    notice_filter = _NoticeFilter()
    for name in NOTICE_LOGGERS:
        logging.getLogger(name).addFilter(notice_filter)


_install_triton_stub()

import torch  # noqa: E402

install_notice_filter(torch.cuda.is_available())
import megatron.core  # noqa: E402  (must follow the stub and the filter)

MCORE_VERSION = getattr(megatron.core, "__version__", "unknown")
