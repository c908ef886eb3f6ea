"""Cross-field rules of a well-typed config, each issue with key, value and fix; the one home of
the model-split, world-size and attention-backend rules that the runtime, the model spec and the
converters ask too."""

from __future__ import annotations

from typing import List, Optional

from megatron_sft.errors import InputError
from megatron_sft.config.schema import ModelConfig, ParallelConfig, SFTConfig, TrainingConfig, as_list


def check_config(cfg: "SFTConfig", *, world_size: int, has_cuda: bool, has_te: Optional[bool] = None) -> List[str]:
    """Every inconsistency of a well-typed config for a job of ``world_size`` processes."""
    issues: List[str] = []
    has_te = has_cuda and te_installed() if has_te is None else has_te
    for check in (_check_positive, _check_model_parallel, _check_batch, _check_devices,
                  _check_schedule, _check_data, _check_outputs):
        if check is _check_devices:
            check(cfg, has_cuda, has_te, issues)
        else:
            check(cfg, world_size, has_cuda, issues)
    return issues


ATTENTION_BACKENDS = ("auto", "te", "torch")


def te_installed() -> bool:
    """Transformer Engine is installed (cheap: no import; ``model.spec`` also checks it imports)."""
    import importlib.util

    return importlib.util.find_spec("transformer_engine") is not None


def resolve_attention_backend(name: str, *, has_cuda: bool, has_te: bool) -> str:
    """The core attention a run uses: ``auto`` is ``te`` with CUDA and Transformer Engine, else
    ``torch``. The one rule: the config checks and the model spec (``model.spec``) ask it.
    Raises ValueError with the fix for an unknown name or ``te`` where it cannot run."""
    if name not in ATTENTION_BACKENDS:
        raise InputError(f"model.attention_backend={name!r}: use one of {', '.join(ATTENTION_BACKENDS)}")
    available = has_cuda and has_te
    if name == "te" and not available:
        missing = "no GPU here" if not has_cuda else "transformer_engine does not import"
        raise InputError(f"model.attention_backend='te' needs a GPU and Transformer Engine ({missing}): install "
                         "the te extra on a GPU machine or use --model.attention_backend=torch")
    return "te" if name != "torch" and available else "torch"


def _check_positive(cfg, world_size, has_cuda, issues):
    t, p, m = cfg.training, cfg.parallel, cfg.model
    for key, value in [
        ("model.num_layers", m.num_layers), ("model.hidden_size", m.hidden_size),
        ("model.num_attention_heads", m.num_attention_heads), ("model.vocab_size", m.vocab_size),
        ("data.seq_length", cfg.data.seq_length), ("training.micro_batch_size", t.micro_batch_size),
        ("training.global_batch_size", t.global_batch_size), ("training.train_steps", t.train_steps),
        ("parallel.tensor_model_parallel_size", p.tensor_model_parallel_size),
        ("parallel.pipeline_model_parallel_size", p.pipeline_model_parallel_size),
        ("parallel.context_parallel_size", p.context_parallel_size),
        ("logging.log_interval", cfg.logging.log_interval),
    ]:
        if value < 1:
            issues.append(f"{key}={value}: must be >= 1")
    for key, value in [("training.lr", t.lr), ("training.min_lr", t.min_lr),
                       ("training.weight_decay", t.weight_decay), ("training.clip_grad", t.clip_grad),
                       ("training.lr_warmup_steps", t.lr_warmup_steps),
                       ("training.eval_interval_steps", t.eval_interval_steps),
                       ("training.max_skipped_steps", t.max_skipped_steps),
                       ("checkpoint.save_interval_steps", cfg.checkpoint.save_interval_steps),
                       ("checkpoint.keep_last", cfg.checkpoint.keep_last),
                       ("data.num_workers", cfg.data.num_workers)]:
        if value < 0:
            issues.append(f"{key}={value}: must be >= 0")


def model_split_problems(m: ModelConfig, tp: int, pp: int, vp: Optional[int] = None, *,
                         qualified: bool = True) -> List[str]:
    """Why ``m`` cannot be split over ``tp`` tensor ranks and ``pp`` pipeline stages (x ``vp``
    virtual chunks). The one home of these rules: the trainer config and the converters ask it.
    ``qualified``: name fields by their config path (``model.``/``parallel.``) or bare (CLI options)."""
    model = (lambda name: f"model.{name}") if qualified else (lambda name: name)
    par = (lambda name: f"parallel.{name}") if qualified else (lambda name: name)
    problems = []
    if tp >= 1:
        for name, value, what in (("num_attention_heads", m.num_attention_heads, "it"),
                                  ("num_query_groups", m.query_groups, "the number of key/value heads"),
                                  ("vocab_size", m.vocab_size, "the embedding rows")):
            if value % tp:
                problems.append(f"{model(name)}={value} is not divisible by {par('tensor_model_parallel_size')}"
                                f"={tp}: choose a TP size that divides {what}")
    if m.query_groups >= 1 and m.num_attention_heads % m.query_groups:
        problems.append(f"{model('num_attention_heads')}={m.num_attention_heads} is not a multiple of "
                        f"{model('num_query_groups')}={m.query_groups}: fix the model's GQA groups")
    stages = pp * (vp or 1)
    if stages >= 1 and m.num_layers % stages:
        problems.append(f"{model('num_layers')}={m.num_layers} is not divisible by pipeline stages x virtual "
                        f"chunks = {pp} x {vp or 1} ({par('pipeline_model_parallel_size')}={pp}): pick PP/VP "
                        "whose product divides num_layers")
    return problems


def world_size_problem(p: ParallelConfig, world_size: int) -> Optional[str]:
    """Why ``world_size`` processes cannot hold the layout ``p`` (data parallel = world / TP*PP*CP)."""
    if p.model_parallel_size >= 1 and world_size % p.model_parallel_size:
        return (f"world size {world_size} is not divisible by TP x PP x CP = {p.tensor_model_parallel_size} x "
                f"{p.pipeline_model_parallel_size} x {p.context_parallel_size}: launch a multiple of "
                f"{p.model_parallel_size} processes or change the parallel section")
    return None


def _check_model_parallel(cfg, world_size, has_cuda, issues):
    m, p = cfg.model, cfg.parallel
    tp, pp, vp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.virtual_pipeline_model_parallel_size
    issues.extend(model_split_problems(m, tp, pp, vp))
    if vp is not None and pp < 2:
        issues.append(f"parallel.virtual_pipeline_model_parallel_size={vp} needs "
                      f"parallel.pipeline_model_parallel_size >= 2 (is {pp}): unset it or raise PP")
    if p.context_parallel_size > 1 and p.context_parallel_comm_type == "a2a" and \
            tp >= 1 and (m.num_attention_heads // tp) % p.context_parallel_size:
        issues.append(f"parallel.context_parallel_comm_type='a2a' splits the {m.num_attention_heads // tp} attention "
                      f"heads per TP rank over context_parallel_size={p.context_parallel_size} ranks, which does "
                      "not divide them: use p2p or a CP size that divides the heads per TP rank")
    if p.sequence_parallel and tp < 2:
        issues.append("parallel.sequence_parallel=true needs parallel.tensor_model_parallel_size >= 2: "
                      "set --parallel.sequence_parallel=false or raise TP")
    problem = world_size_problem(p, world_size)
    if problem:
        issues.append(problem)


def _check_batch(cfg, world_size, has_cuda, issues):
    t, p = cfg.training, cfg.parallel
    model_parallel = p.model_parallel_size
    if model_parallel >= 1 and world_size % model_parallel == 0 and t.micro_batch_size >= 1:
        dp = world_size // model_parallel
        if t.global_batch_size % (t.micro_batch_size * dp):
            issues.append(f"training.global_batch_size={t.global_batch_size} is not divisible by "
                          f"micro_batch_size x data-parallel size = {t.micro_batch_size} x {dp}: set it to a "
                          f"multiple of {t.micro_batch_size * dp}")
        elif (p.virtual_pipeline_model_parallel_size or 1) > 1 and \
                (t.global_batch_size // (t.micro_batch_size * dp)) % p.pipeline_model_parallel_size:
            per_rank = t.global_batch_size // (t.micro_batch_size * dp)
            issues.append(f"training.global_batch_size={t.global_batch_size} gives {per_rank} micro-batches per "
                          f"data-parallel rank; interleaved pipelines run them in groups of pipeline_model_"
                          f"parallel_size={p.pipeline_model_parallel_size}: set global_batch_size to a multiple "
                          f"of {t.micro_batch_size * dp * p.pipeline_model_parallel_size}")
    cp = p.context_parallel_size
    if cp > 1 and cfg.data.seq_length % (2 * cp):
        issues.append(f"data.seq_length={cfg.data.seq_length} is not divisible by 2 x context_parallel_size"
                      f" = {2 * cp}: use a multiple of {2 * cp}")
    if cfg.data.seq_length > cfg.model.max_position_embeddings:
        issues.append(f"data.seq_length={cfg.data.seq_length} exceeds model.max_position_embeddings="
                      f"{cfg.model.max_position_embeddings}: raise max_position_embeddings or shorten packs")


def _check_devices(cfg, has_cuda, has_te, issues):
    p, t, backend = cfg.parallel, cfg.training, cfg.model.attention_backend
    try:
        resolved = resolve_attention_backend(backend, has_cuda=has_cuda, has_te=has_te)
    except ValueError as err:
        issues.append(str(err))
        resolved = None
    if p.context_parallel_size > 1 and resolved == "torch":
        issues.append(f"parallel.context_parallel_size={p.context_parallel_size} needs the te attention "
                      f"backend (model.attention_backend={backend!r}"
                      f"{', no GPU here' if not has_cuda else '' if has_te else ', no Transformer Engine here'}): "
                      "set --model.attention_backend=te on GPUs with Transformer Engine "
                      "or --parallel.context_parallel_size=1")
    if not has_cuda:
        cpu_only = [("parallel.use_distributed_optimizer", p.use_distributed_optimizer, "false"),
                    ("training.bf16", t.bf16, "false")]
        for key, value, fix in cpu_only:
            if value:
                issues.append(f"{key}={str(value).lower()} is not supported on CPU: set --{key}={fix}")
    if t.fp8 is not None:
        if resolved != "te" or not t.bf16:
            issues.append(f"training.fp8={t.fp8!r} needs a GPU, the te attention backend and training.bf16=true "
                          f"(here: {'GPU' if has_cuda else 'no GPU'}, attention_backend={backend!r}, bf16={t.bf16}): "
                          "unset training.fp8 or train on a Hopper-class GPU with --training.bf16=true")
    if t.activation_kernel == "te" and resolved != "te":
        issues.append(f"training.activation_kernel='te' needs the te attention backend (model.attention_backend="
                      f"{backend!r} resolves to {resolved!r} here): set --training.activation_kernel=auto")
    if t.lm_head_chunk_tokens < 1:
        issues.append(f"training.lm_head_chunk_tokens={t.lm_head_chunk_tokens}: must be >= 1")
    if t.recompute_granularity == "full" and (t.recompute_method is None or t.recompute_num_layers is None):
        issues.append("training.recompute_granularity='full' needs training.recompute_method (uniform|block) "
                      "and training.recompute_num_layers: set both (e.g. uniform and 1)")
    if t.recompute_modules is not None and t.recompute_granularity != "selective":
        issues.append(f"training.recompute_modules only applies to selective recompute "
                      f"(recompute_granularity={t.recompute_granularity!r}): unset it or set selective")
    if t.recompute_granularity != "full" and t.recompute_method:
        issues.append(f"training.recompute_method only applies to full recompute "
                      f"(recompute_granularity={t.recompute_granularity!r}): unset it")
    if t.recompute_granularity == "none" and t.recompute_num_layers is not None:
        issues.append("training.recompute_num_layers applies to full or selective recompute "
                      "(recompute_granularity='none'): unset it or choose a granularity")
    if t.recompute_num_layers is not None and t.recompute_num_layers < 0:
        issues.append(f"training.recompute_num_layers={t.recompute_num_layers}: must be >= 0")


def _check_schedule(cfg, world_size, has_cuda, issues):
    t = cfg.training
    decay_steps = t.lr_decay_steps if t.lr_decay_steps is not None else t.train_steps
    if t.min_lr > t.lr:
        issues.append(f"training.min_lr={t.min_lr} exceeds training.lr={t.lr}: set min_lr <= lr")
    if t.lr_warmup_steps > decay_steps and t.lr_decay_style != "constant":
        issues.append(f"training.lr_warmup_steps={t.lr_warmup_steps} must be <= the decay steps "
                      f"({decay_steps}): shorten the warmup or raise training.lr_decay_steps")
    if not 0.0 <= t.adam_beta1 < 1.0 or not 0.0 <= t.adam_beta2 < 1.0:
        issues.append(f"training.adam_beta1/adam_beta2=({t.adam_beta1}, {t.adam_beta2}): each must be in [0, 1)")
    if t.eval_steps is not None and t.eval_steps < 1:
        issues.append(f"training.eval_steps={t.eval_steps}: must be >= 1 or null (whole validation set)")


def _check_data(cfg, world_size, has_cuda, issues):
    d, t = cfg.data, cfg.training
    train = as_list(d.train_prefix)
    if not train:
        issues.append("data.train_prefix is empty: give at least one dataset prefix")
    if d.train_weights is not None:
        if len(d.train_weights) != len(train):
            issues.append(f"data.train_weights has {len(d.train_weights)} entries for {len(train)} "
                          "train prefixes: give one weight per prefix")
        if any(w < 0 for w in d.train_weights) or sum(d.train_weights) <= 0:
            issues.append(f"data.train_weights={d.train_weights}: weights must be >= 0 with a positive sum")
    if t.eval_interval_steps > 0 and not as_list(d.valid_prefix):
        issues.append(f"training.eval_interval_steps={t.eval_interval_steps} needs data.valid_prefix: "
                      "set it or --training.eval_interval_steps=0")


def _check_outputs(cfg, world_size, has_cuda, issues):
    c = cfg.checkpoint
    if c.save_interval_steps > 0 and not c.save:
        issues.append(f"checkpoint.save_interval_steps={c.save_interval_steps} needs checkpoint.save: "
                      "set --checkpoint.save=DIR")


def ineffective_settings(cfg: "SFTConfig") -> List[str]:
    """Settings that are valid but do nothing in this config (warned once at start-up)."""
    t, c, lg = cfg.training, cfg.checkpoint, cfg.logging
    notes = []
    if t.eval_steps is not None and t.eval_interval_steps == 0:
        notes.append("training.eval_steps has no effect with training.eval_interval_steps=0 (except --eval-only)")
    if c.keep_last and not c.save:
        notes.append("checkpoint.keep_last has no effect without checkpoint.save")
    if lg.dir is None and c.save is None:
        notes.append("no logging.dir and no checkpoint.save: metrics go to the console only")
    if t.lr_decay_style == "constant" and (t.min_lr or t.lr_decay_steps is not None):
        notes.append("training.min_lr/lr_decay_steps have no effect with lr_decay_style=constant")
    if t.lm_head == "full" and t.lm_head_chunk_tokens != TrainingConfig.lm_head_chunk_tokens:
        notes.append("training.lm_head_chunk_tokens has no effect with training.lm_head=full")
    if cfg.data.train_weights is not None and len(as_list(cfg.data.train_prefix)) == 1:
        notes.append("data.train_weights has no effect with a single train prefix")
    return notes
