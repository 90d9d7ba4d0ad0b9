"""Real model shapes for the end-to-end benchmark (no download: shapes, not weights, decide speed).

Values are those of the published config.json of each checkpoint. `layers` reduces the depth
where the full model would not fit one GPU for the measured mode (the row says so); the per-layer
work, which is what the kernels change, is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class E2EModel:
    name: str            # checkpoint whose shapes these are
    model_type: str
    shape: dict = field(default_factory=dict)
    full_layers: int | None = None    # layer count for full fine-tuning if reduced
    lora_layers: int | None = None    # layer count for LoRA if reduced
    lora_experts: bool = False        # MoE: LoRA also on the expert stacks (PEFT target_parameters)

    def config(self, mode: str):
        from transformers import AutoConfig

        layers = self.full_layers if mode == "full" else self.lora_layers
        shape = dict(self.shape)
        if layers:
            shape["num_hidden_layers"] = layers
        return AutoConfig.for_model(self.model_type, **shape)

    def layers_note(self, mode: str) -> str:
        layers = self.full_layers if mode == "full" else self.lora_layers
        return f"{layers} of {self.shape['num_hidden_layers']} layers" if layers else "all layers"


_LLAMA3 = dict(vocab_size=128256, rope_theta=500000.0, max_position_embeddings=131072, rms_norm_eps=1e-5)

MODELS = [
    E2EModel("Llama-3.2-1B", "llama", dict(_LLAMA3, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                          num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                                          tie_word_embeddings=True)),
    E2EModel("Llama-3.1-8B", "llama", dict(_LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                          num_attention_heads=32, num_key_value_heads=8, head_dim=128),
             full_layers=8),
    E2EModel("Qwen3-0.6B", "qwen3", dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                                        num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                                        head_dim=128, tie_word_embeddings=True, rms_norm_eps=1e-6)),
    E2EModel("Qwen3-8B", "qwen3", dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                                      num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                                      head_dim=128, rms_norm_eps=1e-6), full_layers=8),
    E2EModel("Qwen2.5-7B", "qwen2", dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                                        num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                                        rms_norm_eps=1e-6), full_layers=8),
    E2EModel("Qwen3-30B-A3B", "qwen3_moe", dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                                               moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                                               num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                                               head_dim=128, rms_norm_eps=1e-6, norm_topk_prob=True),
             full_layers=4, lora_layers=8, lora_experts=True),
    # allenai/OLMoE-1B-7B-0924: 64 experts, top-8; full fine-tuning of all 16 layers (6.9B parameters
    # with fp32 AdamW state) does not fit one GPU beside the activations: 8 layers.
    E2EModel("OLMoE-1B-7B", "olmoe", dict(vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_experts=64,
                                         num_experts_per_tok=8, num_hidden_layers=16, num_attention_heads=16,
                                         num_key_value_heads=16, rms_norm_eps=1e-5, norm_topk_prob=False,
                                         max_position_embeddings=4096, tie_word_embeddings=False),
             full_layers=8, lora_experts=True),
    E2EModel("Mistral-7B-v0.3", "mistral", dict(vocab_size=32768, hidden_size=4096, intermediate_size=14336,
                                               num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                               head_dim=128, sliding_window=None), full_layers=8),
    E2EModel("Mixtral-8x7B", "mixtral", dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                                            num_local_experts=8, num_experts_per_tok=2, num_hidden_layers=32,
                                            num_attention_heads=32, num_key_value_heads=8, head_dim=128),
             full_layers=2, lora_layers=4, lora_experts=True),
    E2EModel("Gemma-2-2B", "gemma2", dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216,
                                         num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                                         head_dim=256, sliding_window=4096, final_logit_softcapping=30.0,
                                         attn_logit_softcapping=50.0, query_pre_attn_scalar=256)),
    E2EModel("Gemma-3-1B", "gemma3_text", dict(vocab_size=262144, hidden_size=1152, intermediate_size=6912,
                                              num_hidden_layers=26, num_attention_heads=4, num_key_value_heads=1,
                                              head_dim=256, sliding_window=512, query_pre_attn_scalar=256)),
    E2EModel("Phi-3-mini", "phi3", dict(vocab_size=32064, hidden_size=3072, intermediate_size=8192,
                                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32)),
    E2EModel("OLMo-2-7B", "olmo2", dict(vocab_size=100352, hidden_size=4096, intermediate_size=11008,
                                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32),
             full_layers=8),
    E2EModel("Granite-3.1-8B", "granite", dict(vocab_size=49155, hidden_size=4096, intermediate_size=12800,
                                              num_hidden_layers=40, num_attention_heads=32, num_key_value_heads=8,
                                              logits_scaling=16.0, residual_multiplier=0.22,
                                              embedding_multiplier=12.0, attention_multiplier=0.0078125),
             full_layers=8),
    E2EModel("Starcoder2-7B", "starcoder2", dict(vocab_size=49152, hidden_size=4608, intermediate_size=18432,
                                                num_hidden_layers=32, num_attention_heads=36, num_key_value_heads=4),
             full_layers=8),
    E2EModel("Pythia-1.4B", "gpt_neox", dict(vocab_size=50304, hidden_size=2048, intermediate_size=8192,
                                            num_hidden_layers=24, num_attention_heads=16)),
    E2EModel("Falcon-7B", "falcon", dict(vocab_size=65024, hidden_size=4544, num_hidden_layers=32,
                                        num_attention_heads=71, multi_query=True, parallel_attn=True,
                                        new_decoder_architecture=False), full_layers=8),
]

BY_NAME = {m.name: m for m in MODELS}
