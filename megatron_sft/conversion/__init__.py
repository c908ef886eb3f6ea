"""Hugging Face <-> Megatron checkpoint conversion (Llama 3.x, Mistral, Qwen2/2.5, Qwen3).

Modules (import them directly; this package imports nothing, so it stays cheap):

    common.py       key-map engine (KeyRule, ``{}`` = layer), transforms (QKV grouped per query
                    group, SwiGLU [gate; up]), Architecture registry, errors
    llama.py        Llama + Mistral key map and config mapping (also the shared decoder map)
    qwen2.py        + QKV bias;  qwen3.py  + QK-norm (q_layernorm / k_layernorm)
    hf_io.py        streaming safetensors reader/writer, tokenizer files, generation_config
    dist_io.py      the "model" dist checkpoint (one process, CPU)
    convert.py      hf_to_megatron(hf_dir, out_dir, ...), megatron_to_hf(megatron_dir, out_dir, ...)

CLIs: tools/convert_hf_to_megatron.py, tools/convert_megatron_to_hf.py.
"""
