"""Small local look-alikes of the seed's remote-code models (../shared/REMOTE_ARCHITECTURES.md).

Their code cannot be fetched here, so each variant rebuilds the structure fastft must reach: the
norm class and its eps attribute name, the LM head's name and kind (NormHead, tied, muP-scaled),
fused W_pack projections, [seq, batch, hidden] activations, layers without a norm. The forward
follows the remote files' shape: embeddings -> blocks -> final norm -> head -> logits (-> loss).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn
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


class NormHead(nn.Module):  # Baichuan 2: rows L2-normalised before the product
    def __init__(self, hidden, vocab):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(vocab, hidden) * hidden**-0.5)

    def forward(self, hidden_states):
        return F.linear(hidden_states, F.normalize(self.weight, dim=-1))


NORMS = {
    "llama_rms": LlamaStyleRMSNorm,
    "bare_rms_epsilon": RMSNorm,
    "glm_rms": GLMRMSNorm,
    "layernorm": lambda h: nn.LayerNorm(h, eps=1e-5),
}


class Block(nn.Module):
    def __init__(self, c, has_attention=True):
        super().__init__()
        h = c.hidden_size
        make = NORMS[c.norm]
        if has_attention:
            setattr(self, c.norm_names[0], make(h))
            self.W_pack = nn.Linear(h, 3 * h, bias=c.qkv_bias)  # fused q‖k‖v
            self.o_proj = nn.Linear(h, h, bias=False)
        self.has_attention = has_attention
        setattr(self, c.norm_names[1], make(h))
        self.gate_proj = nn.Linear(h, 2 * h, bias=False)
        self.up_proj = nn.Linear(h, 2 * h, bias=False)
        self.down_proj = nn.Linear(2 * h, h, bias=False)
        self.c = c

    def forward(self, x):  # x: [B, T, H]
        c = self.c
        if self.has_attention:
            q, k, v = self.W_pack(getattr(self, c.norm_names[0])(x)).chunk(3, dim=-1)
            split = lambda t: t.view(*t.shape[:2], 2, -1).transpose(1, 2)  # noqa: E731
            a = F.scaled_dot_product_attention(split(q), split(k), split(v), is_causal=True)
            x = x + self.o_proj(a.transpose(1, 2).reshape(x.shape))
        norm = getattr(self, c.norm_names[1])
        if c.seq_first:  # ChatGLM keeps activations [seq, batch, hidden]
            y = norm(x.transpose(0, 1)).transpose(0, 1)
        else:
            y = norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(y)) * self.up_proj(y))


class RemoteLikeForCausalLM(nn.Module):
    def __init__(self, **overrides):
        super().__init__()
        c = SimpleNamespace(vocab_size=96, hidden_size=32, num_hidden_layers=2, norm="llama_rms",
                            norm_names=("input_layernorm", "post_attention_layernorm"), head_name="lm_head",
                            norm_head=False, tied=False, pre_head_scale=1.0, post_head_scale=1.0, z_loss_weight=0.0,
                            seq_first=False, qkv_bias=False, attention_layers=None)
        for k, v in overrides.items():
            setattr(c, k, v)
        self.config = c
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
