"""The trainer: build once (runtime, data, model, optimizer, schedule, sampler, metrics), then a
loop that reads like the algorithm: step, log, evaluate, save, stop on SIGTERM.

One step = the next ``global_batch_size`` packs of the sample stream, split over DP ranks into
micro-batches, run through Megatron's forward/backward schedule (any PP/VP), one optimizer update.
The logged loss is sum(w * ce) / sum(w) over the whole global batch: the value the gradient is of.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from typing import Callable, List, Optional

import torch
import torch.distributed as dist

import megatron_sft.mcore  # noqa: F401  (must precede megatron.core imports)
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_sft.checkpoint_files import CheckpointError, checkpoint_path
from megatron_sft.config import SFTConfig, as_list, config_to_dict, config_to_yaml
from megatron_sft.errors import InputError, SFTError
from megatron_sft.model.lm_head import SupervisedTargets, supervised_head_loss
from megatron_sft.training import checkpoint as ckpt
from megatron_sft.training import checkpoint_guard as guard
from megatron_sft.training import resume_compat as compat
from megatron_sft.training.flops import causal_pairs, peak_tflops, step_flops
from megatron_sft.training.inputs import (BatchBuilder, check_tokenizers, describe_pack, eval_micro_batches,
                                          fixed_micro_batch_length, open_datasets, source_names, source_offsets,
                                          train_batches)
from megatron_sft.training.loss import LossReport, make_loss_func, report_width, summarize
from megatron_sft.training.metrics import MetricsWriter, memory_gib
from megatron_sft.training.model_setup import build_model, load_model_state, model_sharded_state_dict
from megatron_sft.training.optimizer import (adopt_learning_rates, build_optimizer, build_scheduler,
                                           finish_optimizer_step, prepare_for_loading, start_optimizer_step)
from megatron_sft.training.sampler import SampleStream

logger = logging.getLogger("megatron_sft")


class TrainingError(SFTError, RuntimeError):
    """Training cannot go on (e.g. too many non-finite steps in a row); the message says why."""


def skip_reason(loss: float, norm: float) -> str:
    """Why an update was skipped, naming the value that is not finite: a NaN grad norm of a step
    with a finite loss is reported as such, not as a non-finite loss."""
    if not math.isfinite(loss):
        return f"non-finite loss {loss} (no gradient norm computed)"
    if not math.isfinite(norm):
        return f"non-finite grad_norm {norm} (the loss {loss:.6g} is finite)"
    return f"the optimizer rejected the update (loss {loss:.6g}, grad_norm {norm:.6g})"


STEP_STATS = ("tokens", "targets", "causal_pairs", "stop_requested")
"""What a step sums over the ranks besides the loss report: real tokens, supervised targets,
causal attention pairs (for FLOPs), and how many ranks got a SIGTERM."""


class Trainer:
    """Holds everything a run needs; ``train()`` and ``evaluate()`` are the two entry points."""

    def __init__(self, cfg: SFTConfig, *, eval_only: bool = False):
        self.cfg, self.eval_only = cfg, eval_only
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self._lock = self._lock_save_dir()  # first: a directory in use is refused before any work
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.cp_group = parallel_state.get_context_parallel_group() if cfg.parallel.context_parallel_size > 1 else None
        self.train_sets = [] if eval_only else open_datasets(as_list(cfg.data.train_prefix), cfg, "train")
        self.valid_sets = open_datasets(as_list(cfg.data.valid_prefix), cfg, "valid") if cfg.data.valid_prefix else []
        check_tokenizers(self.train_sets + self.valid_sets, cfg)
        all_sets = self.train_sets or self.valid_sets
        self.data_meta = all_sets[0].meta if all_sets else {}
        self.fixed_length = fixed_micro_batch_length(self.train_sets + self.valid_sets, cfg)
        self.model = build_model(cfg)
        self.optimizer = None if eval_only else build_optimizer(cfg, self.model)
        self.scheduler = None if eval_only else build_scheduler(cfg, self.optimizer)
        if self.optimizer is not None:
            self._hook_megatron_config()
        self.stream = SampleStream([len(d) for d in self.train_sets], cfg.data.train_weights, cfg.data.seed) \
            if self.train_sets else None
        self.step, self.skipped_in_row, self._saved_step = 0, 0, None
        self._stop = False  # set by SIGTERM on this rank
        self._stop_agreed = False  # some rank had it set at the last step's all-reduce
        log_dir = cfg.logging.dir or cfg.checkpoint.save
        self.metrics = MetricsWriter(log_dir, rank=self.rank, tensorboard=cfg.logging.tensorboard,
                                     wandb_project=cfg.logging.wandb_project, wandb_config=config_to_dict(cfg))
        self.peak = peak_tflops(torch.cuda.get_device_name() if torch.cuda.is_available() else None, cfg.training.bf16)
        if cfg.checkpoint.save:
            ckpt.check_save_dependencies()
        self._restore()

    # ------------------------------------------------------------------ build helpers
    def _hook_megatron_config(self) -> None:
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.utils import get_model_config

        config = get_model_config(self.model[0])
        config.grad_scale_func = self.optimizer.scale_loss
        config.finalize_model_grads_func = finalize_model_grads
        no_sync = [chunk.no_sync for chunk in self.model]
        config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync

    def _builder(self, datasets) -> BatchBuilder:
        cp_rank = parallel_state.get_context_parallel_rank()
        return BatchBuilder(datasets, source_offsets(datasets), self.cfg, cp_rank, self.fixed_length)

    # ------------------------------------------------------------------ the loop
    def train(self) -> str:
        """Train to ``training.train_steps``; returns ``"done"`` or ``"preempted"`` (SIGTERM)."""
        cfg, t = self.cfg, self.cfg.training
        self._install_sigterm()
        batches = train_batches(self._builder(self.train_sets), self.stream, self.dp_rank, self.dp_size,
                                cfg.data.num_workers)
        names = source_names(self.train_sets)
        if self.rank == 0:
            first = self.train_sets[0][0]
            logger.info("first training pack, supervised targets in «»:\n%s",
                        describe_pack(first, self.data_meta.get("tokenizer")))
        micro_batches = None
        while self.step < t.train_steps:
            # The step time includes building micro-batches: the first step's its own, later ones
            # the next step's, built while the GPU still runs this step's backward.
            start = time.perf_counter()
            ahead = []
            if micro_batches is None:
                micro_batches = next(batches)
            record = self.train_step(micro_batches, names, start,
                                     prefetch=lambda: ahead.append(next(batches)))
            micro_batches = ahead[0] if ahead else None
            if self.step % cfg.logging.log_interval == 0 or self.step == t.train_steps:
                self.metrics.write(record)
            if t.eval_interval_steps and self.step % t.eval_interval_steps == 0 and self.step < t.train_steps:
                self.evaluate()
            if cfg.checkpoint.save_interval_steps and self.step % cfg.checkpoint.save_interval_steps == 0:
                self.save()
            if self._stop_agreed:
                logger.info("SIGTERM: saving at step %d and exiting", self.step)
                if self._saved_step != self.step:
                    self.save()
                return "preempted"
        if t.eval_interval_steps:
            self.evaluate()
        if cfg.checkpoint.save and self._saved_step != self.step:
            self.save()
        return "done"

    def train_step(self, micro_batches, names: List[str], start: Optional[float] = None,
                   prefetch: Optional[Callable[[], None]] = None) -> dict:
        """One optimizer step over this rank's ``micro_batches``; returns the metrics record.

        The host runs ahead of the GPU: once the backward pass is queued, the gradient norm's
        reduction is queued behind it and ``prefetch`` (the next step's batch) runs before the
        first wait for the GPU (the loss sums), so that neither leaves the GPU idle."""
        start = time.perf_counter() if start is None else start
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        reports = self._forward_backward(micro_batches, len(names), forward_only=False)
        pending = start_optimizer_step(self.optimizer)
        if prefetch is not None:
            prefetch()
        report, stats = self._global_sums(reports, micro_batches, len(names))
        self._stop_agreed = stats["stop_requested"]
        loss = summarize(report, names)
        applied, norm = (False, float("nan"))
        # The schedule counts applied updates; update k uses lr(k) (warmup: k/W x lr, never 0).
        self.scheduler.step(1)
        lr = self.optimizer.param_groups[0]["lr"]
        if math.isfinite(loss.loss):
            applied, norm = finish_optimizer_step(self.optimizer, pending, self.cfg.training.clip_grad)
        if not applied:
            self.scheduler.step(-1)
        self.stream.consumed_samples += self.cfg.training.global_batch_size
        self.step += 1
        self._account_skip(applied, loss.loss, norm)
        elapsed = time.perf_counter() - start
        return self._step_record(loss, norm, lr, stats, elapsed, skipped=not applied)

    def _account_skip(self, applied: bool, loss: float, norm: float) -> None:
        if applied:
            self.skipped_in_row = 0
            return
        self.skipped_in_row += 1
        reason = skip_reason(loss, norm)
        logger.warning("step %d skipped: %s (%d in a row)", self.step, reason, self.skipped_in_row)
        if self.skipped_in_row > self.cfg.training.max_skipped_steps:
            raise TrainingError(
                f"step {self.step}: {reason} ({self.skipped_in_row} step(s) in a row, training.max_skipped_steps="
                f"{self.cfg.training.max_skipped_steps}). Lower training.lr, check the data, or raise "
                "training.max_skipped_steps to skip such steps")

    def _step_record(self, loss: LossReport, norm: float, lr: float, stats: dict, elapsed: float,
                     skipped: bool) -> dict:
        flops = step_flops(self.cfg.model, stats["tokens"], stats["causal_pairs"])
        tflops = flops / elapsed / self.world_size / 1e12
        record = {
            "step": self.step, "loss": loss.loss, "grad_norm": norm,
            "lr": lr, "supervised_tokens": stats["targets"],
            "tokens_per_s_per_gpu": stats["tokens"] / elapsed / self.world_size,
            "tflops_per_gpu": tflops, "mfu": tflops / self.peak if self.peak else None,
            "step_time_s": elapsed, "memory_gib": memory_gib(), "epoch": self.stream.epoch,
        }
        if skipped:
            record["skipped"] = True
        record.update({f"loss/{name}": value for name, value in loss.per_source.items()})
        return record

    # ------------------------------------------------------------------ forward/backward
    def _forward_backward(self, micro_batches, num_sources: int, forward_only: bool) -> list:
        """Megatron's schedule over ``micro_batches``; returns the last stage's loss reports."""
        num_sources = max(num_sources, 1)
        device, cp_group, t = self.device, self.cp_group, self.cfg.training

        def forward_step(data_iterator, model):
            cpu_batch = next(data_iterator)
            batch = cpu_batch.to(device)
            if t.lm_head == "full":
                output = model(batch.tokens, batch.position_ids, None, labels=batch.model_labels(),
                               packed_seq_params=batch.packed_seq_params)
                return output, make_loss_func(batch.loss_weight, batch.source_index, num_sources, cp_group)
            # Logits only where there is a target; positions found on the CPU copy (no host sync).
            targets = SupervisedTargets.from_batch(cpu_batch.labels, cpu_batch.loss_weight, cpu_batch.source_index,
                                                   t.lm_head_chunk_tokens).to(device)
            output = model(batch.tokens, batch.position_ids, None, packed_seq_params=batch.packed_seq_params,
                           output_processor=supervised_head_loss, output_processor_context=targets)
            return output, make_loss_func(targets.loss_weight, targets.source_index, num_sources, cp_group)

        iterators = [iter(micro_batches) for _ in self.model]
        # Used by the schedule only for fixed-length micro-batches (interleaved pipelines); with
        # variable lengths the stages exchange shapes first.
        padded_length = self.fixed_length or self.cfg.training.micro_batch_size * self.cfg.data.seq_length
        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iterators if len(iterators) > 1 else iterators[0],
            model=self.model, num_microbatches=len(micro_batches),
            seq_length=padded_length, micro_batch_size=1, forward_only=forward_only)

    def _global_sums(self, reports: list, micro_batches, num_sources: int):
        """Sum the loss reports (last stage) and batch statistics over all ranks, each counted
        once: loss sums from TP rank 0 of the last stage (every CP shard), statistics from the
        (TP 0, CP 0, last stage) rank of each DP replica. The same all-reduce carries every
        rank's SIGTERM flag (``stats["stop_requested"]``), so stopping costs no extra host sync
        per step: the one here is needed anyway (the loss decides whether the update applies).
        Returns ``(report, stats)``: the summed report (``loss.summarize`` reads it) and
        ``STEP_STATS`` by name."""
        report = torch.zeros(report_width(num_sources), dtype=torch.float64)
        stats = dict.fromkeys(STEP_STATS, 0.0)
        last_stage = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        tp0 = parallel_state.get_tensor_model_parallel_rank() == 0
        if last_stage and tp0:
            for r in reports:
                report += r["sums"].double().cpu()
            if parallel_state.get_context_parallel_rank() == 0:
                lengths = [int(n) for b in micro_batches if b.num_real_tokens
                           for n in torch.diff(b.packed_seq_params.cu_seqlens_q).tolist()]
                stats.update(tokens=sum(b.num_real_tokens for b in micro_batches),
                             targets=sum(b.num_targets for b in micro_batches), causal_pairs=causal_pairs(lengths))
        stats["stop_requested"] = 1.0 if self._stop else 0.0
        local = torch.cat([report, torch.tensor([stats[k] for k in STEP_STATS], dtype=torch.float64)])
        local = local.to(self.device)
        dist.all_reduce(local)
        local = local.cpu()
        report, summed = local[:report.numel()], local[report.numel():].tolist()
        stats = {name: int(value) for name, value in zip(STEP_STATS, summed)}
        stats["stop_requested"] = stats["stop_requested"] > 0
        return report, stats

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> LossReport:
        """Validation loss over the validation set (or ``eval_steps`` global batches of it)."""
        if not self.valid_sets:
            raise InputError("evaluation needs validation data: set --data.valid_prefix=PREFIX")
        names = source_names(self.valid_sets)
        builder = self._builder(self.valid_sets)
        batches = eval_micro_batches(builder, [len(d) for d in self.valid_sets], self.cfg, self.dp_rank,
                                     self.dp_size, self.cfg.training.eval_steps)
        total, targets = None, 0
        for chunk in self.model:
            chunk.eval()
        with torch.no_grad():
            for micro_batches in batches:
                reports = self._forward_backward(micro_batches, len(names), forward_only=True)
                sums, stats = self._global_sums(reports, micro_batches, len(names))
                total = sums if total is None else total + sums
                targets += stats["targets"]
        for chunk in self.model:
            chunk.train()
        report = summarize(total, names)
        report.num_targets = targets
        record = {"step": self.step, "eval_loss": report.loss, "eval_tokens": targets}
        record.update({f"eval_loss/{name}": value for name, value in report.per_source.items()})
        self.metrics.write(record)
        return report

    # ------------------------------------------------------------------ checkpoints
    def _state(self, loading: bool, with_rng: bool = True) -> dict:
        state = model_sharded_state_dict(self.model)
        if self.optimizer is not None:
            state["optimizer"] = self.optimizer.sharded_state_dict(
                dict(state), is_loading=loading, metadata=ckpt.OPTIMIZER_METADATA)
        if with_rng:
            state["rng_state"] = ckpt.rng_state_sharded(self.rank, self.world_size)
        state["trainer"] = {
            "step": self.step, "skipped_in_row": self.skipped_in_row,
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "sampler": self.stream.state_dict() if self.stream else None,
            "world_size": self.world_size,
        }
        return state

    def save(self) -> str:
        files = {"config.yaml": config_to_yaml(self.cfg), "data_meta.json": json.dumps(self.data_meta, indent=2)}
        path = ckpt.save_checkpoint(self.cfg.checkpoint.save, self.step, self._state(loading=False), files,
                                    run_id=self.run_id, history=self.history, keep_last=self.cfg.checkpoint.keep_last)
        self.history = [i for i in self.history if i != self.step] + [self.step]
        self._saved_step = self.step
        logger.info("saved checkpoint %s", path)
        return path

    def _lock_save_dir(self) -> Optional[guard.SaveDirLock]:
        """Rank 0 locks ``checkpoint.save`` for the run (an error on every rank if another run holds it)."""
        if not self.cfg.checkpoint.save or self.eval_only:
            return None
        lock, error = guard.SaveDirLock(self.cfg.checkpoint.save), None
        if self.rank == 0:
            try:
                lock.acquire()
            except CheckpointError as err:
                error = str(err)
        guard.raise_if_any(error)
        return lock

    def _restore(self) -> None:
        c = self.cfg.checkpoint
        self._check_load_dir()
        resumed, skipped = None, []
        if c.load and os.path.isdir(c.load):
            resumed, skipped = ckpt.resolve_resume(c.load, c.fallback_to_previous)
        if resumed is None and self.eval_only and c.load:
            raise CheckpointError(f"--eval-only: checkpoint.load={c.load} holds no checkpoint to evaluate: "
                                  "point it at a save directory or one iter_* directory")
        # before any weight is read: a save directory of another run is refused at once
        self.run_id, self.history = ckpt.claim_save_dir(None if self.eval_only else c.save, resumed, skipped,
                                                        c.overwrite)
        if resumed is not None:
            self._resume(resumed)
        elif c.pretrained:
            self._load_pretrained(c.pretrained)

    def _check_load_dir(self) -> None:
        """A ``checkpoint.load`` that does not exist is a typo, unless it is the save directory
        (one command that starts a run and resumes it)."""
        c = self.cfg.checkpoint
        if not c.load or os.path.isdir(c.load):
            return
        if self.eval_only or not c.save or os.path.abspath(c.load) != os.path.abspath(c.save):
            raise CheckpointError(f"checkpoint.load={c.load} does not exist: fix the path, or unset "
                                  "checkpoint.load (set it equal to checkpoint.save to start a run that "
                                  "resumes itself)")

    def _load_pretrained(self, directory: str) -> None:
        path = checkpoint_path(directory)
        ckpt.verify_or_raise(path)
        compat.check_model_tensors(path, model_sharded_state_dict(self.model), "checkpoint.pretrained")
        load_model_state(self.model, ckpt.load_checkpoint(path, model_sharded_state_dict(self.model)))
        logger.info("loaded pretrained weights from %s", path)

    def _resume(self, path: str) -> None:
        compat.check_resume_config(path, self.cfg, self.data_meta, eval_only=self.eval_only)
        compat.check_model_tensors(path, model_sharded_state_dict(self.model), "checkpoint.load")
        common = ckpt.load_common(path)
        saved = common.get("trainer") or {}
        same_layout = saved.get("world_size") == self.world_size
        if self.eval_only:  # weights only
            loaded = ckpt.load_checkpoint(path, model_sharded_state_dict(self.model))
            load_model_state(self.model, loaded)
            self.step = int(saved.get("step", 0))
            return
        prepare_for_loading(self.optimizer)
        loaded = ckpt.load_checkpoint(path, self._state(loading=True, with_rng=same_layout))
        load_model_state(self.model, loaded)
        adopt_learning_rates(loaded["optimizer"], self.cfg.training.lr, self.cfg.training.min_lr)
        try:
            self.optimizer.load_state_dict(loaded["optimizer"])
        except KeyError as err:
            if not self.cfg.parallel.use_distributed_optimizer:
                raise
            # Megatron-Core 0.19.2 distrib_optimizer.py:1223 expects FusedAdam's state layout.
            raise InputError(f"cannot load the distributed optimizer state of {path} (missing {err}): "
                             "Megatron-Core 0.19.2 loads it only with Transformer Engine's FusedAdam; "
                             "install the te extra (pip install -e .[te])") from err
        trainer = loaded["trainer"]
        self.scheduler.load_state_dict(trainer["scheduler"])
        self.stream.load_state_dict(trainer["sampler"])
        self.step, self.skipped_in_row = int(trainer["step"]), int(trainer["skipped_in_row"])
        if same_layout:
            ckpt.restore_rng_state(loaded["rng_state"])
        logger.info("resumed from %s at step %d (sample %d)", path, self.step, self.stream.consumed_samples)

    # ------------------------------------------------------------------ preemption
    def _install_sigterm(self) -> None:
        if self.cfg.checkpoint.save_on_sigterm and self.cfg.checkpoint.save:
            signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        # Every rank learns of it at the next step's all-reduce (``_global_sums``) and stops after
        # that step, all at once.
        self._stop = True

    def close(self) -> None:
        self.metrics.close()
        if self._lock is not None:
            self._lock.release()
