"""PEFT LoRA models as the LoRA tests compare them: the kernels' dropout mask on the reference side
(SeededDropout, use_kernel_dropout) and a (to be patched, plain PEFT) pair of a tiny model (lora_pair)."""

import copy

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM

from fastft.architectures import NATIVE
from fastft.kernels.lora import draw_seed, lora_dropout
from fastft.patching.probe import is_lora_layer

ARCH = {a.name: a for a in NATIVE}
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FACTOR = 4.0  # model-level errors compound over layers (as in the architecture matrix)


class SeededDropout(nn.Module):
    """PEFT-side dropout applying the kernels' mask for a seed drawn as the fused layer draws it."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        return lora_dropout(x, self.p, draw_seed())


def use_kernel_dropout(*models, p: float) -> None:
    """Give every PEFT LoRA layer of `models` SeededDropout(p): a reference that applies the
    fused layers' masks (drawn in the same order under the same torch seed)."""
    for model in models:
        for m in model.modules():
            if is_lora_layer(m) and p > 0:
                for k in m.lora_dropout:
                    m.lora_dropout[k] = SeededDropout(p)


def lora_pair(arch="Llama", targets=ALL_LINEAR, dropout=0.0, seed_dropout=False, **lora):
    """(model, plain): a tiny PEFT model (LoRA B drawn non-zero) and its deep copy, both in training mode."""
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(ARCH[arch].tiny_config())
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=dropout, **lora))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    plain = copy.deepcopy(model)
    if seed_dropout:  # the reference applies the kernels' mask, drawn in the same order
        use_kernel_dropout(plain, p=dropout)
    return model.train(), plain.train()
