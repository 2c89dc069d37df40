"""Reference architectures: random weights of these shapes cost what the real models cost (benchmarks, and
``model.source: random``)."""

# google/gemma-3-1b-it's text configuration (Gemma3TextConfig), as given in ../shared/GPU.md.
GEMMA3_1B = dict(vocab_size=262144, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
                 num_attention_heads=4, num_key_value_heads=1, head_dim=256, sliding_window=512,
                 max_position_embeddings=32768, rope_theta=1_000_000.0, rope_local_base_freq=10000.0,
                 query_pre_attn_scalar=256, rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh",
                 pad_token_id=0, eos_token_id=1, bos_token_id=2)

ARCHS = {"gemma-3-1b": GEMMA3_1B}  # model.random.arch
