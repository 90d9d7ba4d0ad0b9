"""Recurrent mixers in packed rows (fastft/patching/recurrent.py): Bamba's Mamba2 layers.

Unpatched, a packed row leaks: document 2's mixer starts from document 1's conv window and SSM
state (the packed probe says so). Patched, the torch path (no mamba kernels here) runs each
document from the zero state, and packed == one document at a time (the matrix,
tests/test_architectures.py, compares loss, logits and every gradient in fp32 and bf16); where
the kernels are installed the mixer is handed seq_idx instead.
"""

import copy

import torch
from torch import nn
from transformers import AutoModelForCausalLM

import fastft
from fastft import attention
from fastft.architectures import NATIVE
from fastft.patching import packed_probe, recurrent
from fastft.patching.report import PatchReport
from numerics import assert_within_eager

BAMBA = next(a for a in NATIVE if a.name == "Bamba")


def _bamba():
    # attention only in layer 1 of 2: layer 0 is a Mamba2 mixer
    return AutoModelForCausalLM.from_config(BAMBA.tiny_config()).eval()


def test_unpatched_bamba_leaks_and_patched_bamba_does_not():
    model = _bamba()
    assert packed_probe.run(model, model).verdict == "unsafe"
    report = fastft.patch(model)
    assert [e.module for e in report.patched("recurrent")] == ["model.layers.0.mamba"], str(report)
    assert report.packing_safe, report.packing


def test_the_torch_path_runs_each_document_from_the_zero_state():
    model = _bamba()
    mixer = model.model.layers[0].mamba
    truth_mixer = copy.deepcopy(mixer).double()  # the tolerance rule's truth: unpatched, float64
    report = fastft.patch(model, rms_norm=False, cross_entropy=False)
    lengths = (7, 20, 5)  # 20 > the chunk size 16: the chunked scan crosses a chunk boundary
    hidden = torch.randn(1, sum(lengths), model.config.hidden_size)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    state = attention.state_for(attention.installed(model), model, (), {"input_ids": positions,
                                                                         "position_ids": positions})
    with torch.no_grad(), attention.active(state):
        packed = mixer(hidden_states=hidden)[0]
    with torch.no_grad():
        alone, truth = (torch.cat([forward(hidden[:, s:s + n].to(dtype))[0] for s, n in zip((0, 7, 27), lengths)])
                        for forward, dtype in ((mixer.forward.__wrapped__, torch.float32), (truth_mixer, torch.float64)))
    assert_within_eager("packed mixer", packed, alone, truth, torch.float32)
    state.fold()  # what the model's post-hook does when a forward ends (this state was entered by hand)
    assert report.attention_calls[("model.layers.0.mamba", "recurrent/per-document")] == 1


class _RecordingMixer(nn.Module):
    """A Mamba-shaped module (A_log, conv1d) whose forward records what it is handed."""

    def __init__(self):
        super().__init__()
        self.A_log = nn.Parameter(torch.zeros(2))
        self.conv1d = nn.Conv1d(4, 4, 3, groups=4)
        self.seen = []

    def forward(self, hidden_states, cache=None, attention_mask=None, **kwargs):
        self.seen.append(kwargs)
        return hidden_states


def test_seq_idx_goes_to_the_mamba_kernels_where_they_are_installed(monkeypatch):
    monkeypatch.setattr(recurrent, "kernels_available", lambda device: True)
    holder = nn.Module()
    holder.mixer = _RecordingMixer()
    report = PatchReport("holder")
    assert recurrent.install(holder, report) == ["mixer"]
    installed = attention.Installed(None, report.attention_calls, {}, [], [])
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2]])
    state = attention.state_for(installed, holder, (), {"input_ids": positions, "position_ids": positions})
    with attention.active(state):
        holder.mixer(hidden_states=torch.randn(1, 8, 4))
    seq_idx = holder.mixer.seen[-1]["seq_idx"]
    assert seq_idx.dtype == torch.int32 and seq_idx.tolist() == [[0, 0, 0, 1, 1, 2, 2, 2]]
    with attention.active(attention.state_for(installed, holder, (), {"input_ids": positions[:, :3],
                                                                      "position_ids": positions[:, :3]})):
        holder.mixer(hidden_states=torch.randn(1, 3, 4))
    assert "seq_idx" not in holder.mixer.seen[-1]  # one document: the mixer runs untouched
    recurrent.uninstall(holder, ["mixer"])
    assert "forward" not in holder.mixer.__dict__
