"""Model side of the trainer: layer spec, attention backends, model construction, LM head.
(Process set-up, distributed init and the CPU patches of Megatron are ``megatron_sft.runtime``.)

This package imports nothing, so ``import megatron_sft.model`` stays cheap; import the modules:

- ``spec``: ``resolve_attention_backend(name)`` (``config.resolve_attention_backend`` on this
  machine) and ``get_layer_spec(model_cfg, backend)``, the one place the backend is chosen.
- ``attention``: ``TorchCoreAttention``, the torch backend's core attention (THD and SBHD, GQA).
- ``build``: ``transformer_config_from`` (Megatron's TransformerConfig from our sections, with
  ``calculate_per_token_loss=True``), ``build_gpt_model`` / ``build_model_chunks`` (one chunk per
  virtual pipeline stage), and the canonical (TE-named) sharded state dicts that checkpoints of
  either backend use.
- ``lm_head``: the supervised LM head (logits and cross-entropy only at target positions,
  chunked, gradient taken in the same pass) plugged in through GPTModel's ``output_processor``.

The loss recipe (weighted sums that Megatron divides by the global weight) lives in
``megatron_sft.training.loss``; the labels and weights in ``megatron_sft.data.labels``.
"""
