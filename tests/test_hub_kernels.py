"""fastft beside transformers' hub kernels (fastft/patching/hub_kernels.py): one replacement per
layer, fastft's forwards survive every re-kernelize, hub kernels stay where fastft has nothing,
and the report names what runs. The CPU has no hub mapping, so a fake one stands in for the hub:
its repositories load local layers, one of which raises if it is ever probed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

kernels = pytest.importorskip("kernels", reason="transformers' hub kernels need the kernels package")
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

import fastft  # noqa: E402
from fastft.architectures import TINY  # noqa: E402

CALLS = {"silu": 0}


class HubSiLU(nn.Module):
    def forward(self, input):
        CALLS["silu"] += 1
        return nn.functional.silu(input)


class HubRMSNorm(nn.Module):
    def forward(self, hidden_states):
        raise AssertionError("a hub forward ran where fastft probes or replaces the layer's own")


class FakeRepo:
    """A kernels repository that loads a local layer (kernels.LayerRepository downloads one)."""

    def __init__(self, layer, fails: Exception | None = None):
        self.layer, self.fails = layer, fails
        # kernels memoizes loaded layers by repository: one that fails has a name of its own
        self.repo_id = f"fake/{layer.__name__.lower()}" + ("-unreachable" if fails is not None else "")
        self.layer_name = layer.__name__

    def load(self):
        if self.fails is not None:
            raise self.fails
        return self.layer

    def __hash__(self):
        return hash(self.repo_id)

    def __eq__(self, other):
        return isinstance(other, FakeRepo) and other.repo_id == self.repo_id


def fake_hub(fails: Exception | None = None):
    both = lambda repo: {"cpu": {kernels.Mode.TRAINING: repo, kernels.Mode.INFERENCE: repo}}  # noqa: E731
    return kernels.use_kernel_mapping({"SiLU": both(FakeRepo(HubSiLU, fails)), "RMSNorm": both(FakeRepo(HubRMSNorm))})


def tiny_llama():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **TINY))


def on_hub(model) -> set[str]:
    return {name for name, m in model.named_modules() if "_kernel_repo" in m.__dict__}


def test_fastft_replaces_layers_own_forward_and_hub_kernels_stay_elsewhere():
    model = tiny_llama()
    with fake_hub():
        model.set_use_kernels(True)  # what from_pretrained does by default since transformers 5.25
        assert {"model.norm", "model.layers.0.mlp.act_fn"} <= on_hub(model)
        report = fastft.patch(model)  # HubRMSNorm raises if a probe ran it
        norms = [e for e in report.entries if e.kind == "rms_norm"]
        assert norms and all(e.replacement == "FusedRMSNorm" for e in norms)
        assert on_hub(model) == {f"model.layers.{i}.mlp.act_fn" for i in range(2)}  # fastft has no SiLU
        hub_rows = {e.module: e.replacement for e in report.hub_entries}
        assert hub_rows["model.layers.0.mlp.act_fn"] == "hub fake/hubsilu:HubSiLU"
        assert "hub fake/hubsilu:HubSiLU" in str(report) and "transformers hub kernels: on" in str(report)
        for switch in (model.eval, model.train):  # each re-kernelizes
            switch()
            assert on_hub(model) == {f"model.layers.{i}.mlp.act_fn" for i in range(2)}
        CALLS["silu"] = 0
        model(torch.tensor([[3, 4, 5]]), labels=torch.tensor([[3, 4, 5]]))
        assert CALLS["silu"] == 2  # the hub SiLU of each layer ran
        fastft.unpatch(model)
        assert "model.norm" in on_hub(model)  # the restored norms get their hub kernel back


def test_recurrent_mixer_patch_survives_train_and_eval():
    """Qwen3.5's gated-delta-net mixer is hub-tagged: kernelize used to drop fastft's document
    resets at the first train()/eval() (packed rows then leak between documents)."""
    config = AutoConfig.for_model("qwen3_5_text", **TINY, layer_types=["linear_attention", "full_attention"],
                                  linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                                  linear_value_head_dim=16, head_dim=16)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.set_use_kernels(True)
    report = fastft.patch(model)
    mixer = model.model.layers[0].linear_attn
    original = type(mixer).__mro__[1]
    assert report.count("recurrent") == 1 and report.packing_safe, report
    for switch in (model.eval, model.train, model.eval):
        switch()
        assert "forward" in mixer.__dict__, f"fastft's mixer forward dropped by {switch.__name__}()"
    assert any(e.module == "model.layers.0.linear_attn" and e.replacement == "fastft's forward"
               for e in report.hub_entries)
    fastft.unpatch(model)
    assert type(mixer) is original and "forward" not in mixer.__dict__


@pytest.fixture
def saved_llama(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "llama")
    return str(tmp_path / "llama")


def test_from_pretrained_leaves_hub_kernels_off_unless_asked(saved_llama):
    with fake_hub():
        model = fastft.from_pretrained(saved_llama)
        assert not model.use_kernels and not on_hub(model)
        assert model.fastft_report.hub_kernels == "off"
        model = fastft.from_pretrained(saved_llama, use_kernels=True)
        assert model.use_kernels and on_hub(model) == {f"model.layers.{i}.mlp.act_fn" for i in range(2)}
        assert model.fastft_report.hub_kernels.startswith("on (mode inference")


def test_patch_of_a_model_loaded_with_transformers_defaults(saved_llama):
    """On the CPU transformers maps nothing: the report says hub kernels are on and what runs."""
    model = AutoModelForCausalLM.from_pretrained(saved_llama)
    if not model.use_kernels:
        pytest.skip("this transformers does not kernelize by default")
    report = fastft.patch(model)
    assert report.hub_kernels.startswith("on (") and not on_hub(model)
    assert all(e.replacement in ("", "fastft's forward") for e in report.hub_entries)
    model.train()
    assert report.count("rms_norm") == 5


def test_a_hub_kernel_that_cannot_load_is_a_report_line_not_a_raise(saved_llama):
    offline = ConnectionError("offline: HF_HUB_OFFLINE=1 and fake/hubsilu is not cached")
    with fake_hub(fails=offline):
        model = fastft.from_pretrained(saved_llama, use_kernels=True)
    assert not on_hub(model)
    assert model.fastft_report.hub_kernels.startswith("off: ConnectionError: offline"), model.fastft_report.hub_kernels
    assert model.fastft_report.count("rms_norm") == 5


def test_trainer_applies_hub_kernels_only_when_asked(tmp_path):
    """--model.hub_kernels=true: the trainer kernelizes once the model is on its device, after
    fastft's patches; the hub SiLU then runs in every training step."""
    from fastft.train import finetune

    recipe = {
        "model": {"config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                             "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 256},
                  "hub_kernels": True},
        "data": {"max_seq_len": 64, "batch_size": 2, "builtin_examples": 200},
        "train": {"max_steps": 2, "eval_every": 0, "eval_batches": 1, "eval_generate": 0, "eval_before": False,
                  "precision": "fp32"},
        "checkpoint": {"export": False, "every": 0},
        "logging": {"run_dir": str(tmp_path / "run"), "quiet": True, "progress_bar": False, "tensorboard": False,
                    "plot": False},
    }
    with fake_hub():
        CALLS["silu"] = 0
        result = finetune(recipe)
        assert result.status == "finished" and CALLS["silu"] > 0
        recipe["model"].update(hub_kernels=False, patch=False)  # (patching is not what this half checks)
        recipe["logging"]["run_dir"] = str(tmp_path / "off")
        CALLS["silu"] = 0
        finetune(recipe)
        assert CALLS["silu"] == 0
