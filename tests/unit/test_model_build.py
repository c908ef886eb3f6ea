"""Pure parts of the model side: backend choice, TransformerConfig mapping, key mapping."""

import pytest
import torch

from megatron_sft.config import ModelConfig, ParallelConfig, RopeScalingConfig
from megatron_sft.model.build import canonical_key, transformer_config_from
from megatron_sft.model.spec import get_layer_spec, resolve_attention_backend
from megatron_sft.model.attention import TorchCoreAttention

MODEL = ModelConfig(num_layers=4, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4,
                    num_query_groups=2, vocab_size=512, add_qkv_bias=True, norm_epsilon=1e-6)


def test_resolve_attention_backend_on_this_machine():
    expected = "te" if torch.cuda.is_available() and _has_te() else "torch"
    assert resolve_attention_backend("auto") == expected
    assert resolve_attention_backend("torch") == "torch"
    with pytest.raises(ValueError, match="use one of auto, te, torch"):
        resolve_attention_backend("flash")
    if expected == "torch":
        with pytest.raises(ValueError, match="use --model.attention_backend=torch"):
            resolve_attention_backend("te")


def _has_te():
    try:
        import transformer_engine.pytorch  # noqa: F401
        return True
    except Exception:
        return False


def test_transformer_config_from():
    parallel = ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2, sequence_parallel=True)
    cfg = transformer_config_from(MODEL, parallel, recompute_granularity="full", recompute_method="uniform",
                                  recompute_num_layers=1, overrides={"bias_dropout_fusion": True})
    assert (cfg.num_layers, cfg.hidden_size, cfg.ffn_hidden_size) == (4, 64, 176)
    assert (cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels) == (4, 2, 16)
    assert cfg.normalization == "RMSNorm" and cfg.layernorm_epsilon == 1e-6
    assert cfg.gated_linear_unit and cfg.activation_func is torch.nn.functional.silu
    assert not cfg.add_bias_linear and cfg.add_qkv_bias
    assert cfg.calculate_per_token_loss and cfg.variable_seq_lengths
    assert cfg.hidden_dropout == 0 and cfg.attention_dropout == 0
    assert (cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size, cfg.sequence_parallel) == (2, 2, True)
    assert cfg.recompute_granularity == "full" and cfg.bias_dropout_fusion
    assert cfg.use_cpu_initialization == (not torch.cuda.is_available())
    assert transformer_config_from(MODEL, ParallelConfig(), bf16=True, params_dtype=torch.bfloat16).bf16
    assert cfg.cp_comm_type is None  # no context parallelism
    a2a = ParallelConfig(context_parallel_size=2, context_parallel_comm_type="a2a")
    assert transformer_config_from(MODEL, a2a).cp_comm_type == "a2a"


def test_canonical_key():
    assert canonical_key("decoder.layers.3.input_layernorm.weight") == \
        "decoder.layers.3.self_attention.linear_qkv.layer_norm_weight"
    assert canonical_key("decoder.layers.0.pre_mlp_layernorm.weight") == \
        "decoder.layers.0.mlp.linear_fc1.layer_norm_weight"
    for same in ("decoder.final_layernorm.weight", "decoder.layers.1.self_attention.q_layernorm.weight",
                 "decoder.layers.1.mlp.linear_fc1.layer_norm_weight", "output_layer.weight"):
        assert canonical_key(same) == same


def test_torch_layer_spec_uses_our_modules():
    spec = get_layer_spec(ModelConfig(**{**MODEL.__dict__, "qk_layernorm": True}), "torch")
    attention = spec.submodules.self_attention.submodules
    assert attention.core_attention is TorchCoreAttention
    assert spec.submodules.input_layernorm.__name__ == "RMSNorm" and attention.q_layernorm.__name__ == "RMSNorm"
    assert spec.submodules.sharded_state_dict_keys_map == {
        "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
        "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}
    with pytest.raises(ValueError, match="resolved"):
        get_layer_spec(MODEL, "auto")


def test_rope_scaling_type_checked_before_building():
    from megatron_sft.model.build import build_gpt_model

    bad = ModelConfig(**{**MODEL.__dict__, "rope_scaling": RopeScalingConfig(rope_type="yarn")})
    with pytest.raises(ValueError, match="only llama3"):
        build_gpt_model(bad, ParallelConfig(), backend="torch")


def test_llama3_rope_scaling_matches_transformers():
    """Our inv_freq (all four HF parameters) equals transformers' llama3 rope init."""
    from types import SimpleNamespace

    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from megatron_sft.model.build import _apply_rope_scaling

    scaling = RopeScalingConfig(factor=32.0, low_freq_factor=2.0, high_freq_factor=8.0,
                                original_max_position_embeddings=1024)
    model_cfg = ModelConfig(**{**MODEL.__dict__, "rotary_base": 500000.0, "rope_scaling": scaling})
    model = SimpleNamespace(rotary_pos_emb=RotaryEmbedding(kv_channels=16, rotary_percent=1.0, rotary_base=500000.0,
                                                           use_cpu_initialization=True))
    _apply_rope_scaling(model, model_cfg, SimpleNamespace(kv_channels=16))
    hf = LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=8192, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 2.0,
        "high_freq_factor": 8.0, "original_max_position_embeddings": 1024})
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    torch.testing.assert_close(model.rotary_pos_emb.inv_freq, expected.float(), rtol=1e-6, atol=0)
    assert not torch.equal(expected, RotaryEmbedding(16, 1.0, rotary_base=500000.0, use_cpu_initialization=True).inv_freq)


def test_cpu_grad_clipping_scales_by_max_over_total():
    from megatron_sft.runtime import _clip_grad_by_total_norm_cpu

    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))]
    params[0].grad, params[1].grad = torch.tensor([3.0, 0.0, 4.0]), torch.tensor([1.0, -2.0])
    _clip_grad_by_total_norm_cpu(params, max_norm=1.0, total_norm=4.0)
    scale = 1.0 / (4.0 + 1e-6)
    torch.testing.assert_close(params[0].grad, torch.tensor([3.0, 0.0, 4.0]) * scale)
    torch.testing.assert_close(params[1].grad, torch.tensor([1.0, -2.0]) * scale)
    _clip_grad_by_total_norm_cpu(params, max_norm=10.0, total_norm=4.0)  # below max: unchanged
    torch.testing.assert_close(params[1].grad, torch.tensor([1.0, -2.0]) * scale)


def test_setup_model_parallel_rejects_a_layout_the_world_cannot_hold():
    import torch.distributed as dist

    from megatron_sft.runtime import setup_model_parallel

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match=r"world size 1 is not divisible by TP x PP x CP = 2 x 2 x 1"):
            setup_model_parallel(ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2))
    finally:
        dist.destroy_process_group()


def test_speed_overrides_pick_the_swiglu_kernel(monkeypatch, tmp_path):
    """On GPU, fused kernels use Megatron's SwiGLU unless ``training.activation_kernel: te`` asks
    for TE's op (then Megatron's fusion is off: the two may not both be set). No effect on CPU."""
    from megatron_sft.config import load_config
    from megatron_sft.training.model_setup import speed_overrides

    from tests.unit.test_config import write

    cfg = load_config(write(tmp_path), ["--training.activation_kernel=te"], has_cuda=True, has_te=True)
    assert speed_overrides(cfg, "te") == {}  # this machine has no CUDA
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    fields = speed_overrides(cfg, "te")
    assert fields["use_te_activation_func"] and not fields["bias_activation_fusion"]
    cfg.training.activation_kernel = "auto"
    fields = speed_overrides(cfg, "te")
    assert fields["bias_activation_fusion"] and "use_te_activation_func" not in fields


def test_te_activation_spec_needs_the_te_backend():
    with pytest.raises(ValueError, match="te_activation needs the te backend"):
        get_layer_spec(MODEL, "torch", te_activation=True)
