"""Process runtime: torch.distributed, Megatron's parallel state, and the CPU patch set.

``initialize_distributed`` + ``setup_model_parallel`` are all a trainer needs; on a machine
without CUDA the latter applies ``apply_cpu_patches()`` so Megatron-Core 0.19.2 runs on CPU with
gloo (tests, laptops). On CUDA machines nothing is patched.

The CPU patches (process-global, idempotent, written for megatron-core 0.19.2):

1. Megatron modules call ``torch.cuda.current_device()`` (buffers, RoPE, TP/SP mappings, p2p),
   ``torch.cuda.synchronize()`` (batched p2p, checkpoint save), ``torch.cuda.current_stream()``
   (DDP grad sync waits on it) and create tensors with a literal ``device="cuda"`` (every pipeline
   schedule's ``total_num_tokens``, the optimizer's flags, checkpoint verification). Rather than a
   global ``TorchFunctionMode`` (which sees every op: +40% step time on tiny models), the ``torch``
   name inside exactly those Megatron modules (``_PATCHED_MODULES``) is rebound to ``_CpuTorch``,
   a forwarding proxy whose ``cuda`` namespace answers "cpu" / no-ops and whose tensor factories
   map ``cuda`` devices to ``cpu``. torch itself and every other module are untouched.
2. Gradient clipping: ``clip_grad_by_total_norm_fp32`` asserts CUDA tensors and uses a fused
   kernel; the optimizer module gets a plain ``torch._foreach_mul_`` version (the norm itself
   is computed by Megatron, across model-parallel ranks, unchanged).
3. RNG: the tracker is Megatron's no-op inference tracker (``fork()`` does not switch state;
   dropout is 0 for SFT) and ``tensor_parallel.random._get/_set_cuda_rng_state`` (used by
   activation recompute) save/restore the CPU generator. Random init is made layout-independent
   by ``use_cpu_initialization`` (full weights drawn, then split: TP) and per-layer seeds
   (``build.seed_layers_by_number``: PP, VP).

Not patched, hence unsupported on CPU: distributed optimizer, bf16/fp16 optimizer, overlapped
grad reduce, fused kernels (``gradient_accumulation_fusion``, ``persist_layer_norm``,
``apply_rope_fusion``), Transformer Engine, context parallel. A Megatron module outside
``_PATCHED_MODULES`` that reaches ``torch.cuda`` fails loudly; add it to the list.
"""

from __future__ import annotations

import datetime
import importlib
import logging
import os
from typing import Optional

import torch

import megatron_sft.mcore  # noqa: F401  (must precede every megatron.core import)
from megatron_sft.config import ParallelConfig, world_size_problem
from megatron_sft.errors import InputError

logger = logging.getLogger(__name__)

_PATCHED_MODULES = (
    "megatron.core.utils",  # GlobalMemoryBuffer
    "megatron.core.parallel_state",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.random",
    "megatron.core.tensor_parallel.utils",
    "megatron.core.tensor_parallel.data",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.transformer.module",
    "megatron.core.transformer.transformer_layer",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.fully_parallel",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.async_utils",
    "megatron.core.dist_checkpointing.tensor_aware_state_dict",
)
"""Megatron modules whose ``torch`` global becomes ``_CpuTorch`` on CPU (none use torch.compile)."""

_PATCHES_WRITTEN_FOR = "0.19.2"
_FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange", "zeros_like", "ones_like", "empty_like", "full_like")
_PATCHED = False


def _cpu_device(device):
    if isinstance(device, int) or (device is not None and torch.device(device).type == "cuda"):
        return torch.device("cpu")
    return device


class _NullStream:
    """Stands in for a CUDA stream/event: CPU work is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _NullStream()

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _CpuCuda:
    """The ``torch.cuda`` seen by patched Megatron modules; anything else forwards to torch.cuda."""

    Stream = _NullStream
    Event = _NullStream

    @staticmethod
    def current_device():
        return "cpu"

    @staticmethod
    def synchronize(*args, **kwargs):
        pass

    @staticmethod
    def current_stream(*args, **kwargs):
        return _NullStream()

    @staticmethod
    def stream(*args, **kwargs):
        return _NullStream()

    @staticmethod
    def manual_seed(seed):
        torch.manual_seed(seed)

    @staticmethod
    def get_rng_state(*args, **kwargs):
        return torch.get_rng_state()

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


class _CpuTorch:
    """Forwards to ``torch``; ``cuda`` is ``_CpuCuda`` and tensor factories map cuda -> cpu."""

    cuda = _CpuCuda()

    def __getattr__(self, name):
        value = getattr(torch, name)
        if name in _FACTORIES:
            factory = value

            def value(*args, _factory=factory, **kwargs):
                if "device" in kwargs:
                    kwargs["device"] = _cpu_device(kwargs["device"])
                return _factory(*args, **kwargs)

        setattr(self, name, value)  # cache: later lookups skip __getattr__
        return value


def _get_rng_state_cpu(device=None, clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    return torch.get_rng_state()


def _set_rng_state_cpu(new_state: torch.Tensor, device=None, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


def _clip_grad_by_total_norm_cpu(parameters, max_norm, total_norm, use_decoupled_grad: bool = False):
    """Megatron's ``clip_grad_by_total_norm_fp32`` without its CUDA-only type assert and fused
    kernel: scale every fp32 grad by ``max_norm / total_norm`` when that is < 1."""
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr) for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if isinstance(clip_coeff, torch.Tensor):
        clip_coeff = clip_coeff.clamp_max(1.0)
    elif clip_coeff >= 1.0:
        return
    torch._foreach_mul_(grads, clip_coeff)


def _on_cpu_tensors(method):
    """``method`` with ``Tensor.cuda()`` returning the tensor itself while it runs (for Megatron
    code that moves a tensor with ``.cuda()`` rather than through ``torch.cuda``)."""

    def wrapper(*args, **kwargs):
        original = torch.Tensor.cuda
        torch.Tensor.cuda = lambda tensor, *a, **k: tensor
        try:
            return method(*args, **kwargs)
        finally:
            torch.Tensor.cuda = original

    wrapper.__wrapped__ = method
    return wrapper


def apply_cpu_patches() -> None:
    """Make Megatron-Core 0.19.2 run on CPU (module docstring). Idempotent; a no-op when CUDA is
    available. Process-global: call once per process, after ``initialize_model_parallel``."""
    global _PATCHED
    if _PATCHED or torch.cuda.is_available():
        return
    from megatron.core.models.common.language_module.language_module import LanguageModule
    from megatron.core.optimizer import optimizer as mcore_optimizer
    from megatron.core.tensor_parallel import random as mpu_random

    if megatron_sft.mcore.MCORE_VERSION.split("+")[0] != _PATCHES_WRITTEN_FOR:
        logger.warning("the CPU patches were written for megatron-core %s, this is %s: re-run "
                       "tests/integration/test_mcore.py", _PATCHES_WRITTEN_FOR, megatron_sft.mcore.MCORE_VERSION)
    proxy = _CpuTorch()
    for name in _PATCHED_MODULES:
        module = importlib.import_module(name)
        if module.__dict__.get("torch") is torch:
            module.torch = proxy
    mcore_optimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_cpu
    mpu_random._get_cuda_rng_state = _get_rng_state_cpu
    mpu_random._set_cuda_rng_state = _set_rng_state_cpu
    mpu_random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    # Tied embeddings under PP: the first and last stages' copies are synced with weight.data.cuda().
    LanguageModule.setup_embeddings_and_output_layer = _on_cpu_tensors(LanguageModule.setup_embeddings_and_output_layer)
    _PATCHED = True
    logger.info("applied the Megatron-Core CPU patches to %d modules", len(_PATCHED_MODULES))


def initialize_distributed(backend: Optional[str] = None, timeout_minutes: int = 30) -> None:
    """Join the torchrun/SLURM process group (env://: RANK, WORLD_SIZE, MASTER_ADDR/PORT,
    LOCAL_RANK). ``backend`` defaults to nccl with CUDA, gloo without; selects the local GPU.
    A single process without MASTER_PORT becomes rank 0 of a world of 1 with an in-process store:
    it listens on no port, so any number of such runs share a host (a fixed default port made the
    second one fail with EADDRINUSE)."""
    if torch.distributed.is_initialized():
        return
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    options = dict(backend=backend or ("nccl" if torch.cuda.is_available() else "gloo"),
                   timeout=datetime.timedelta(minutes=timeout_minutes))
    if os.environ["WORLD_SIZE"] == "1" and "MASTER_PORT" not in os.environ:
        torch.distributed.init_process_group(store=torch.distributed.HashStore(), rank=0, world_size=1, **options)
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    torch.distributed.init_process_group(**options)


def setup_model_parallel(parallel_cfg: ParallelConfig, *, seed: int = 1234) -> None:
    """Megatron's parallel state for ``parallel_cfg`` (data parallel = world / (TP*PP*CP)), the
    CPU patches where CUDA is absent, checkpoint writes without a helper process, and the seeds
    (CPU generator + Megatron's RNG tracker).
    Raises ValueError when the world size does not divide by TP*PP*CP."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_sft.processes import write_checkpoints_in_process

    problem = world_size_problem(parallel_cfg, torch.distributed.get_world_size())
    if problem:
        raise InputError(problem)
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel_cfg.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel_cfg.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel_cfg.virtual_pipeline_model_parallel_size,
        context_parallel_size=parallel_cfg.context_parallel_size,
    )
    apply_cpu_patches()
    write_checkpoints_in_process()  # no checkpoint-writer helper process (megatron_sft/processes.py)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed, inference_rng_tracker=not torch.cuda.is_available())


def teardown_model_parallel() -> None:
    """Destroy Megatron's parallel state and the process group (end of a run or test)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
