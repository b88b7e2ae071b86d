"""Configuration of the Complexity v0.13 decoder ("complexity-deep"), written by complexity-dist convert."""
try:
    from transformers import PreTrainedConfig as _Base
except ImportError:  # transformers 4.x
    from transformers import PretrainedConfig as _Base


class ComplexityConfig(_Base):
    model_type = "complexity-deep"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, vocab_size=32000, hidden_size=256, intermediate_size=704, num_hidden_layers=6,
                 num_attention_heads=4, num_key_value_heads=2, num_experts=4, max_position_embeddings=2048,
                 rope_theta=10000.0, rms_norm_eps=1e-6, dynamics_dt=0.1, dynamics_controller_hidden=64,
                 dynamics_beta_max=2.0, dynamics_velocity_clamp=10.0, mu_highway_scale=0.1,
                 router_base_margin=10.0, initializer_range=0.02, tie_word_embeddings=True, pad_token_id=1,
                 bos_token_id=2, eos_token_id=0, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.num_experts = num_experts
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.dynamics_dt = dynamics_dt
        self.dynamics_controller_hidden = dynamics_controller_hidden
        self.dynamics_beta_max = dynamics_beta_max
        self.dynamics_velocity_clamp = dynamics_velocity_clamp
        self.mu_highway_scale = mu_highway_scale
        self.router_base_margin = router_base_margin
        self.initializer_range = initializer_range
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)
