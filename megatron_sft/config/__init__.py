"""The typed configuration of megatron-sft, mirrored by YAML and loaded strictly.

- ``schema``: the sections (dataclasses), a docstring under every field (it doubles as
  ``--help``), derived values (``ModelConfig.query_groups``, ``head_dim``) as properties.
- ``loader``: ``load_config`` (YAML files + ``--section.key=value`` overrides, model section from
  ``checkpoint.pretrained``), every issue at once; ``load_section`` (any config dataclass from
  ordered layers of dicts, e.g. the preprocessing settings); ``config_to_yaml``.
- ``docs``: field docstrings, type names and the ``--help`` text built from them.
- ``checks``: cross-field rules, including the model-split, world-size and attention-backend
  rules that the runtime, the model spec and the converters ask too.

Megatron's own ``TransformerConfig`` is never re-declared: it is built by one pure function
(``megatron_sft.model.build.transformer_config_from``) from these sections.
"""

from megatron_sft.config.schema import (  # noqa: F401
    CheckpointConfig,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    ParallelConfig,
    RopeScalingConfig,
    SFTConfig,
    TrainingConfig,
    as_list,
)
from megatron_sft.config.checks import (  # noqa: F401
    ATTENTION_BACKENDS,
    check_config,
    ineffective_settings,
    model_split_problems,
    resolve_attention_backend,
    te_installed,
    world_size_problem,
)
from megatron_sft.config.docs import config_help, field_docs, field_summary  # noqa: F401
from megatron_sft.config.loader import (  # noqa: F401
    ConfigError,
    RUN_CHOICE_MODEL_KEYS,
    config_to_dict,
    build_section,
    load_section,
    yaml_layers,
    config_to_yaml,
    load_config,
    parse_overrides,
    pretrained_config_file,
)
