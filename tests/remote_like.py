"""Small local look-alikes of the seed's remote-code models (../shared/REMOTE_ARCHITECTURES.md).

Their code cannot be fetched here, so each variant rebuilds the structure fastft must reach: the
norm class and its eps attribute name, the LM head's name and kind (NormHead, tied, muP-scaled),
fused W_pack projections, [seq, batch, hidden] activations, layers without a norm. Like the
remote files, each is a transformers PreTrainedModel whose attention is its own code (an
`...Attention(nn.Module)` calling SDPA with is_causal=True, never the AttentionInterface), so
`set_attn_implementation` only warns and nothing reads the setting; its rotary-free attention
ignores position_ids, as the remote files' own attention masks ignore packing. The forward
follows the remote files' shape: embeddings -> blocks -> final norm -> head -> logits (-> loss).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast


class LlamaStyleRMSNorm(nn.Module):  # Aquila, InternLM, DeciLM, Solar, MiniCPM: `variance_epsilon`
    def __init__(self, hidden, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.variance_epsilon = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


class RMSNorm(nn.Module):  # Baichuan 2: bare name, `epsilon`, weight allocated uninitialised
    def __init__(self, hidden, epsilon=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(hidden))
        self.epsilon = epsilon

    def forward(self, hidden_states):
        variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.epsilon)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            hidden_states = hidden_states.to(self.weight.dtype)
        return self.weight * hidden_states


class GLMRMSNorm(nn.Module):  # ChatGLM: `eps`, weight applied in fp32 then cast (a "gemma" rounding)
    def __init__(self, hidden, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.eps)
        return (self.weight * hidden_states).to(input_dtype)


class NormHead(nn.Module):
    """Baichuan 2: rows L2-normalised before the product. As in the published code, the first
    eval-mode call writes the normalised rows into the weight (and later eval calls use it as is)."""

    def __init__(self, hidden, vocab):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(vocab, hidden) * hidden**-0.5)
        self.first_flag = True

    def forward(self, hidden_states):
        if self.training:
            norm_weight = F.normalize(self.weight)
            self.first_flag = True
        elif self.first_flag:
            self.first_flag = False
            self.weight.data = F.normalize(self.weight)
            norm_weight = self.weight
        else:
            norm_weight = self.weight
        return F.linear(hidden_states, norm_weight)


NORMS = {
    "llama_rms": LlamaStyleRMSNorm,
    "bare_rms_epsilon": RMSNorm,
    "glm_rms": GLMRMSNorm,
    "layernorm": lambda h: nn.LayerNorm(h, eps=1e-5),
}


class RemoteAttention(nn.Module):
    """One fused q‖k‖v projection (`W_pack`) and SDPA with is_causal=True over the whole row."""

    def __init__(self, c):
        super().__init__()
        h = c.hidden_size
        self.heads = c.num_attention_heads
        self.W_pack = nn.Linear(h, 3 * h, bias=c.qkv_bias)
        self.o_proj = nn.Linear(h, h, bias=False)

    def forward(self, x):  # [B, T, H]
        q, k, v = self.W_pack(x).chunk(3, dim=-1)
        split = lambda t: t.view(*t.shape[:2], self.heads, -1).transpose(1, 2)  # noqa: E731
        a = F.scaled_dot_product_attention(split(q), split(k), split(v), is_causal=True)
        return self.o_proj(a.transpose(1, 2).reshape(x.shape))


class Block(nn.Module):
    def __init__(self, c, has_attention=True):
        super().__init__()
        h = c.hidden_size
        make = NORMS[c.norm]
        if has_attention:
            setattr(self, c.norm_names[0], make(h))
            setattr(self, c.attention_name, RemoteAttention(c))
        self.has_attention = has_attention
        setattr(self, c.norm_names[1], make(h))
        self.gate_proj = nn.Linear(h, 2 * h, bias=False)
        self.up_proj = nn.Linear(h, 2 * h, bias=False)
        self.down_proj = nn.Linear(2 * h, h, bias=False)
        self.c = c

    def forward(self, x):  # x: [B, T, H]
        c = self.c
        if self.has_attention:
            x = x + getattr(self, c.attention_name)(getattr(self, c.norm_names[0])(x))
        norm = getattr(self, c.norm_names[1])
        if c.seq_first:  # ChatGLM keeps activations [seq, batch, hidden]
            y = norm(x.transpose(0, 1)).transpose(0, 1)
        else:
            y = norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(y)) * self.up_proj(y))


class RemoteLikeConfig(PretrainedConfig):
    model_type = "fastft_remote_like"

    def __init__(self, vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 norm="llama_rms", norm_names=("input_layernorm", "post_attention_layernorm"), head_name="lm_head",
                 norm_head=False, tied=False, pre_head_scale=1.0, post_head_scale=1.0, z_loss_weight=0.0,
                 seq_first=False, qkv_bias=False, attention_layers=None, attention_name="self_attn", **kwargs):
        self.vocab_size, self.hidden_size, self.num_hidden_layers = vocab_size, hidden_size, num_hidden_layers
        self.num_attention_heads, self.norm, self.norm_names = num_attention_heads, norm, tuple(norm_names)
        self.head_name, self.norm_head, self.tied = head_name, norm_head, tied
        self.pre_head_scale, self.post_head_scale, self.z_loss_weight = pre_head_scale, post_head_scale, z_loss_weight
        self.seq_first, self.qkv_bias, self.attention_layers = seq_first, qkv_bias, attention_layers
        self.attention_name = attention_name
        kwargs["tie_word_embeddings"] = False  # tied by hand below, as the remote files do
        super().__init__(**kwargs)


class RemoteLikeForCausalLM(PreTrainedModel):
    config_class = RemoteLikeConfig
    base_model_prefix = "model"

    def __init__(self, config=None, **overrides):
        super().__init__(config if config is not None else RemoteLikeConfig(**overrides))
        c = self.config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        layers = c.attention_layers or [True] * c.num_hidden_layers
        self.layers = nn.ModuleList(Block(c, has_attention=a) for a in layers)
        self.norm = NORMS[c.norm](c.hidden_size)
        head = NormHead(c.hidden_size, c.vocab_size) if c.norm_head else nn.Linear(c.hidden_size, c.vocab_size,
                                                                                   bias=False)
        if c.tied:
            head.weight = self.embed_tokens.weight
        holder = self
        if c.head_name == "transformer.output_layer":  # ChatGLM keeps its head inside `transformer`
            self.transformer = nn.Module()
            holder, name = self.transformer, "output_layer"
        else:
            name = c.head_name
        setattr(holder, name, head)
        self._head = (holder, name)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, RMSNorm):
                    m.weight.fill_(1.0)  # Baichuan 2 allocates it uninitialised; its loader fills it

    def _init_weights(self, module):  # the modules' own initialisation, as the remote files keep
        pass

    def get_input_embeddings(self):
        return self.embed_tokens

    def get_output_embeddings(self):
        holder, name = self._head
        return getattr(holder, name)

    def forward(self, input_ids=None, labels=None, attention_mask=None, position_ids=None, use_cache=None,
                return_dict=None, **kwargs):
        c = self.config
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x)
        x = self.norm(x)
        logits = self.get_output_embeddings()(x * c.pre_head_scale) * c.post_head_scale
        loss = None
        if labels is not None:
            shift = F.pad(labels, (0, 1), value=-100)[..., 1:]
            loss = F.cross_entropy(logits.float().flatten(0, 1), shift.flatten(), ignore_index=-100)
            if c.z_loss_weight:  # Baichuan 2: mean over tokens of (max logit)^2
                loss = loss + c.z_loss_weight * logits.float().max(-1).values.pow(2).mean()
        return CausalLMOutputWithPast(loss=loss, logits=logits)
