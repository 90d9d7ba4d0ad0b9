"""The seed's architectures: how each loads, the tiny config its tests build, what fastft patches.

`docs/ARCHITECTURES.md` is generated from this table (python -m fastft.architectures), and
tests/test_architectures.py builds every native entry from `tiny_config` and compares it
patched against unpatched. Patching itself never reads this table: it works by structure.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Shared by every tiny test model: 2 layers, hidden 64, 4 heads (2 KV heads), vocab 128.
TINY = dict(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    tie_word_embeddings=False,
)
_MOE = dict(num_experts=4, num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
            shared_expert_intermediate_size=32, shared_intermediate_size=32, output_router_logits=True,
            router_aux_loss_coef=0.01)


@dataclass(frozen=True)
class Architecture:
    name: str                  # as the seed names it
    source: str                # "native" | "llama-class" | "remote"
    model_type: str | None     # transformers model_type that builds it (native / llama-class)
    overrides: dict = field(default_factory=dict)
    expected: str = ""         # for remote-code models: what structural patching is expected to reach
    covered_by: str = ""       # the test that covers it

    def tiny_config(self, **extra):
        from transformers import AutoConfig

        if self.model_type is None:
            raise ValueError(f"{self.name} is remote code: it has no transformers config here")
        return AutoConfig.for_model(self.model_type, **{**TINY, **self.overrides, **extra})


_MATRIX = "tests/test_architectures.py::test_patched_matches_unpatched"
_REMOTE = "tests/test_remote_structures.py"

ARCHITECTURES: list[Architecture] = [
    Architecture("Bamba", "native", "bamba",
                 dict(mamba_n_heads=8, mamba_d_head=16, mamba_d_state=16, mamba_n_groups=1, attn_layer_indices=[1],
                      mamba_chunk_size=16), covered_by=_MATRIX),
    Architecture("Cohere", "native", "cohere", dict(use_qk_norm=False, logit_scale=0.5), covered_by=_MATRIX),
    Architecture("Cohere2", "native", "cohere2", dict(logit_scale=0.5, sliding_window=8), covered_by=_MATRIX),
    Architecture("Falcon", "native", "falcon", dict(num_key_value_heads=None), covered_by=_MATRIX),
    Architecture("Gemma", "native", "gemma", dict(head_dim=16), covered_by=_MATRIX),
    Architecture("Gemma2", "native", "gemma2", dict(head_dim=16, sliding_window=8, final_logit_softcapping=5.0,
                                                   attn_logit_softcapping=20.0), covered_by=_MATRIX),
    Architecture("Gemma3 (text)", "native", "gemma3_text", dict(head_dim=16, sliding_window=8,
                                                                final_logit_softcapping=5.0), covered_by=_MATRIX),
    Architecture("Glm", "native", "glm", dict(head_dim=16), covered_by=_MATRIX),
    Architecture("Glm4", "native", "glm4", dict(head_dim=16), covered_by=_MATRIX),
    Architecture("GPTBigCode", "native", "gpt_bigcode", dict(n_embd=64, n_layer=2, n_head=4, n_inner=128,
                                                             n_positions=128), covered_by=_MATRIX),
    Architecture("GPTJ", "native", "gptj", dict(n_embd=64, n_layer=2, n_head=4, n_inner=128, n_positions=128,
                                                rotary_dim=8), covered_by=_MATRIX),
    Architecture("GPTNeoX", "native", "gpt_neox", covered_by=_MATRIX),
    Architecture("Granite", "native", "granite", dict(logits_scaling=4.0, residual_multiplier=0.5,
                                                      embedding_multiplier=2.0), covered_by=_MATRIX),
    Architecture("GraniteMoe", "native", "granitemoe", dict(_MOE, logits_scaling=4.0), covered_by=_MATRIX),
    Architecture("GraniteMoeShared", "native", "granitemoeshared", dict(_MOE, logits_scaling=4.0),
                 covered_by=_MATRIX),
    Architecture("Llama", "native", "llama", covered_by=_MATRIX),
    # MLA expands its latent KV to every head (its checkpoints have as many KV heads as heads).
    Architecture("MiniCPM3", "native", "minicpm3", dict(q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8,
                                                        qk_rope_head_dim=8, v_head_dim=16, num_key_value_heads=4),
                 covered_by=_MATRIX),
    Architecture("Mistral", "native", "mistral", dict(sliding_window=8), covered_by=_MATRIX),
    Architecture("Mixtral", "native", "mixtral", dict(_MOE), covered_by=_MATRIX),
    Architecture("Nemotron", "native", "nemotron", covered_by=_MATRIX),
    Architecture("Olmo", "native", "olmo", covered_by=_MATRIX),
    Architecture("Olmo2", "native", "olmo2", covered_by=_MATRIX),
    Architecture("Olmoe", "native", "olmoe", dict(_MOE), covered_by=_MATRIX),
    Architecture("Phi", "native", "phi", covered_by=_MATRIX),
    Architecture("Phi3", "native", "phi3", covered_by=_MATRIX),
    Architecture("Qwen2", "native", "qwen2", covered_by=_MATRIX),
    Architecture("Qwen2Moe", "native", "qwen2_moe", dict(_MOE), covered_by=_MATRIX),
    Architecture("Qwen3", "native", "qwen3", dict(head_dim=16), covered_by=_MATRIX),
    Architecture("Qwen3Moe", "native", "qwen3_moe", dict(_MOE, head_dim=16), covered_by=_MATRIX),
    Architecture("StableLm", "native", "stablelm", covered_by=_MATRIX),
    Architecture("Starcoder2", "native", "starcoder2", covered_by=_MATRIX),
    # Checkpoints that load through LlamaForCausalLM in transformers 5.24.
    Architecture("Exaone 3", "llama-class", "exaone", covered_by=_MATRIX),
    Architecture("InternLM3", "llama-class", "internlm3", covered_by=_MATRIX),
    Architecture("Deepseek LLM 1", "llama-class", "llama", covered_by=_MATRIX),
    Architecture("Yi", "llama-class", "llama", covered_by=_MATRIX),
    # Remote code (trust_remote_code): structural variants covered by local look-alike modules.
    Architecture("Aquila", "remote", None, expected="RMSNorm (variance_epsilon); LM head loss", covered_by=_REMOTE),
    Architecture("Baichuan", "remote", None,
                 expected="RMSNorm (variance_epsilon / epsilon); NormHead loss (rows normalised); W_pack kept "
                          "for LoRA (issue 6); Baichuan 2's max-logit z-loss is not the fused op's lse z-loss, so "
                          "its loss must come from its own forward (patch with cross_entropy=False)",
                 covered_by=_REMOTE),
    Architecture("ChatGLM", "remote", None,
                 expected="RMSNorm (eps) on [seq, batch, hidden] input; output_layer found as the output "
                          "embeddings; fused dense_h_to_4h / query_key_value kept", covered_by=_REMOTE),
    Architecture("DeciLM", "remote", None, expected="RMSNorm (variance_epsilon) in the layers that have one; "
                 "LM head loss (a Linear subclass)", covered_by=_REMOTE),
    Architecture("InternLM", "remote", None, expected="RMSNorm (variance_epsilon); LM head loss",
                 covered_by=_REMOTE),
    Architecture("InternLM2", "remote", None, expected="attention_norm / ffn_norm RMSNorm; `output` head loss; "
                 "wqkv kept", covered_by=_REMOTE),
    Architecture("Jais", "remote", None, expected="nn.LayerNorm ln_1/ln_2/ln_f; tied head loss with the muP "
                 "logit scale read from the probe", covered_by=_REMOTE),
    Architecture("MiniCPM 1", "remote", None, expected="RMSNorm (variance_epsilon); tied head loss (the hidden "
                 "scaling before the head is captured by the head tap)", covered_by=_REMOTE),
    Architecture("Orion", "remote", None, expected="nn.LayerNorm with bias in a Llama layout; LM head loss",
                 covered_by=_REMOTE),
    Architecture("Phi3Small", "remote", None, expected="nn.LayerNorm with bias; the head loss only if the probe "
                 "verifies the logit map (padding-vocab masking is not a scale: left unfused then)",
                 covered_by=_REMOTE),
    Architecture("Solar Pro", "remote", None, expected="RMSNorm (variance_epsilon); LM head loss",
                 covered_by=_REMOTE),
    Architecture("GritLM", "llama-class", "mistral", dict(sliding_window=8), covered_by=_MATRIX),
]

NATIVE = [a for a in ARCHITECTURES if a.model_type is not None]


def _transformers_version() -> str:
    import transformers

    return ".".join(transformers.__version__.split(".")[:2])


def markdown() -> str:
    """docs/ARCHITECTURES.md."""
    lines = [
        "# Architectures",
        "",
        "Generated by `python -m fastft.architectures` from `fastft/architectures.py`; do not edit by hand.",
        "",
        "Native rows are built from a tiny config (2 layers) by the matrix test, patched, and compared with",
        "the unpatched model in float32 and bfloat16 under the Triton interpreter: loss, logits and every",
        "parameter gradient, on an unpacked batch and on a packed one against each document alone. The",
        f"`patched` column is what that test's PatchReport shows on transformers {_transformers_version()} "
        "(`fastft patch-report`",
        "prints the same for any model). `attention in training` is the path fastft's one decision per",
        "forward (fastft/attention.py) takes for packed batches on a GPU in bf16 (bf16 weights, or fp32",
        "masters under bf16 autocast) with flash-attn installed / with torch's varlen_attn only; elsewhere",
        "(a CPU, fp32 without autocast) SDPA with document masks runs. The packed probe checks at patch",
        "time that every attention layer calls it and that packed documents stay independent (`packing`:",
        "a model that is not safe is trained on padded batches). Remote-code rows cannot be loaded here:",
        "their structural variants are built as local look-alikes in the named test, whose packed probe",
        "gives the attention and packing columns.",
        "",
        "| architecture | loads as | patched | attention in training | packing | left alone | test |",
        "|---|---|---|---|---|---|---|",
    ]
    for arch in ARCHITECTURES:
        if arch.model_type is None:
            lines.append(f"| {arch.name} | remote code | expected: {arch.expected} | {REMOTE_ATTENTION} | "
                         f"{REMOTE_PACKING} | | `{arch.covered_by}` |")
            continue
        patched, attention, packing, kept = _patch_summary(arch)
        loads = f"`{arch.model_type}`" + (" (LlamaForCausalLM)" if arch.source == "llama-class" else "")
        lines.append(f"| {arch.name} | {loads} | {patched} | {attention} | {packing} | {kept} | `{arch.covered_by}` |")
    return "\n".join(lines) + "\n"


REMOTE_ATTENTION = ("kept: its own attention code, which never calls fastft's function "
                    "(`set_attn_implementation` only warns)")
REMOTE_PACKING = "unsafe (its attention ignores packing): trained on padded batches"


def _training_attention(config) -> str:
    """The path of a packed training forward on a GPU in bf16, with flash-attn / with torch only."""
    import torch

    from fastft import attention

    features = attention.ModelFeatures.of(config)
    window = getattr(config, "sliding_window", None) or None
    texts = []
    for backends in (attention.DOCUMENTED_BACKENDS, attention.DOCUMENTED_BACKENDS[1:]):
        paths = sorted({attention.decide(device=torch.device("cuda"), dtype=torch.bfloat16, head_dim=features.head_dim,
                                         dropout=features.dropout, window=w, softcap=features.softcap,
                                         backends=backends).label for w in {None, window}})
        texts.append(" + ".join(paths))
    text = texts[0] if texts[0] == texts[1] else f"{texts[0]} (with flash-attn), {texts[1]} (torch only)"
    notes = [f"sliding window {window}" if window else "",
             "soft-capped scores" if features.softcap else "",
             f"attention dropout {features.dropout:g}" if features.dropout else ""]
    return text + "".join(f"; {n}" for n in notes if n)


def _patch_summary(arch: Architecture) -> tuple[str, str, str, str]:
    import torch
    from transformers import AutoModelForCausalLM

    from fastft.patching import patch

    torch.manual_seed(0)
    config = arch.tiny_config()
    report = patch(AutoModelForCausalLM.from_config(config))
    parts = []
    for kind in ("rms_norm", "layer_norm", "cross_entropy", "moe", "recurrent"):
        entries = report.patched(kind)
        if entries:
            notes = sorted({e.reason for e in entries if e.reason})
            parts.append(f"{kind} ×{len(entries)}" + (f" ({'; '.join(notes)})" if notes else ""))
    layers = report.patched("attention")
    if layers:
        attention = f"fastft in {len(layers)} layer{'s' * (len(layers) != 1)}: {_training_attention(config)}"
    else:
        attention = "; ".join(sorted({e.reason for e in report.skipped("attention")}))
    kept = "; ".join(sorted({f"{e.original}: {e.reason}" for e in report.skipped() if e.kind != "attention"}))
    return "<br>".join(parts), attention, report.packing, kept


if __name__ == "__main__":
    import pathlib

    path = pathlib.Path(__file__).resolve().parent.parent / "docs" / "ARCHITECTURES.md"
    path.parent.mkdir(exist_ok=True)
    path.write_text(markdown())
    print(f"wrote {path}")
