"""FSDP2 on two CPU processes (torchrun, gloo) gives the same losses as one process."""

import json
import pathlib
import shutil

import pytest
import torch

from fastft.train import finetune
from helpers.recipes import ROOT, tiny
from helpers.torchrun import assert_run_within_eager, float64_run, torchrun

# On CPUs with gloo. On a machine with one GPU two ranks would not get a device each (and the
# in-process reference would run on the GPU): the comparison is a CPU test.
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="2-process FSDP2 comparison runs on CPUs (gloo)")


@pytest.mark.skipif(shutil.which("torchrun") is None and not hasattr(torch.distributed, "run"), reason="no torchrun")
def test_fsdp2_two_processes_match_one_process(tmp_path):
    # One process: 2 micro-batches of 2 rows per step. Two ranks: 1 micro-batch of 2 rows each; the
    # packing plan deals micro-batches round-robin, so each step sees the same 4 rows.
    common = dict(train={"global_batch_rows": 4, "max_steps": 4, "eval_generate": 2, "eval_batches": 2},
                  data={"batch_size": 2, "max_seq_len": 128, "eval_max_new_tokens": 4})
    single = finetune(tiny(tmp_path / "one", **common))
    # Activation checkpointing recomputes exactly the same values: it is on for the sharded run,
    # which also stops after 2 steps (sharded checkpoint) and is resumed to 4 by a second torchrun.
    sharded_recipe = tiny(tmp_path / "two", distributed={"activation_checkpointing": "full"}, **common)
    sharded_recipe["train"]["run_steps"] = 2
    first = torchrun(tmp_path, sharded_recipe)
    assert first["status"] == "stopped"
    assert (tmp_path / "two" / "checkpoints" / "step_00000002" / "COMPLETE").is_file()
    sharded_recipe["train"]["run_steps"] = None
    sharded_recipe["checkpoint"].update(resume=True, export=True)
    # The first run loaded the model on rank 0 and broadcast it into the shards (the default);
    # the resumed one has each rank build it whole: both paths give the same model.
    sharded_recipe["distributed"]["load"] = "every_rank"
    second = torchrun(tmp_path, sharded_recipe)
    assert single.plan["accumulation"] == 2 and second["plan"]["accumulation"] == 1
    assert_run_within_eager({**second, "losses": first["losses"] + second["losses"]}, single,
                            float64_run(tmp_path, **common))
    assert second["eval"]["count"] == 2  # EM/F1 by generation ran under FSDP2
    # The consolidated export is a plain HF folder.
    assert (pathlib.Path(second["export"]) / "model.safetensors").is_file()


def test_fsdp2_lora_two_processes_match_one_process(tmp_path):
    # PEFT under FSDP2: the adapters train sharded; PeftModel.generate bypasses the FSDP root's
    # hooks, which fastft covers by gathering the root for generation.
    common = dict(train={"global_batch_rows": 4, "max_steps": 3, "eval_generate": 2, "eval_batches": 2},
                  data={"batch_size": 2, "max_seq_len": 128, "eval_max_new_tokens": 4},
                  lora={"enabled": True, "r": 4, "alpha": 8}, optim={"lr": 1e-2, "warmup_steps": 0})
    single = finetune(tiny(tmp_path / "one", **common))
    # The other FSDP2 options change where and when, not what: CPU offload, no resharding after
    # forward, selective activation checkpointing.
    options = {"cpu_offload": True, "reshard_after_forward": False, "activation_checkpointing": "selective"}
    sharded = torchrun(tmp_path, tiny(tmp_path / "two", checkpoint={"export": True}, distributed=options, **common))
    assert_run_within_eager(sharded, single, float64_run(tmp_path, **common))
    assert sharded["eval"]["count"] == 2
    assert (pathlib.Path(sharded["export"]) / "adapter_model.safetensors").is_file()


def test_fsdp2_patched_model_with_the_kernels_matches_one_process(tmp_path):
    # The fused kernels (interpreter on a CPU) under FSDP2. Rows of 64 bytes keep few documents, so
    # the val split has fewer micro-batches than ranks: every rank must still run as many forwards.
    common = dict(train={"global_batch_rows": 4, "max_steps": 2, "eval_generate": 1, "eval_batches": 2},
                  data={"batch_size": 2, "max_seq_len": 64, "eval_max_new_tokens": 3},
                  model={"patch": True, "config": dict(model_type="llama", hidden_size=16, intermediate_size=32,
                                                       num_hidden_layers=2, num_attention_heads=2,
                                                       num_key_value_heads=2)})
    single = finetune(tiny(tmp_path / "one", **common))
    sharded = torchrun(tmp_path, tiny(tmp_path / "two", **common))
    truth = {**common, "model": {**common["model"], "patch": False}}  # the truth: unpatched, float64
    assert_run_within_eager(sharded, single, float64_run(tmp_path, **truth))


STORIES = ROOT.parent / "shared" / "assets" / "models" / "stories260K"
SQUAD_V11 = ROOT.parent / "shared" / "assets" / "squad" / "squad_v1.1_xquad_en.json"


@pytest.mark.skipif(not (STORIES.is_dir() and SQUAD_V11.is_file()), reason="shared assets (stories260K, SQuAD) not present")
def test_fsdp2_rank0_load_of_a_pretrained_checkpoint(tmp_path):
    # A real checkpoint: rank 0 reads it with from_pretrained, rank 1 builds the model from its
    # config on the meta device, and the broadcast weights train as one process does, with the
    # checkpoint's generation config on both paths.
    model = tmp_path / "stories260K"  # with a generation config that its model config does not imply
    shutil.copytree(STORIES, model)
    generation = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({**generation, "max_length": 77}))
    common = dict(model={"name": str(model), "config": None, "patch": False},
                  data={"source": str(SQUAD_V11), "max_seq_len": 256, "batch_size": 2, "eval_max_new_tokens": 4},
                  train={"global_batch_rows": 4, "max_steps": 2, "eval_generate": 2, "eval_batches": 2},
                  checkpoint={"export": True})
    single = finetune(tiny(tmp_path / "one", **common))
    sharded = torchrun(tmp_path, tiny(tmp_path / "two", **common))
    assert_run_within_eager(sharded, single, float64_run(tmp_path, **common))
    assert sharded["eval"]["count"] == 2
    exported = json.loads((pathlib.Path(sharded["export"]) / "generation_config.json").read_text())
    assert exported["max_length"] == 77
    assert exported == json.loads((pathlib.Path(single.export_dir) / "generation_config.json").read_text())


def test_apply_fsdp_takes_the_expert_mesh_and_units_together():
    """apply_fsdp is given the expert units (it never asks fastft.expert_parallel): a mesh without
    units, or units without a mesh, is refused before anything is sharded."""
    from torch import nn

    from fastft import distributed

    model = nn.Sequential(nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)]))
    with pytest.raises(ValueError, match="expert_mesh given with 0 expert_units"):
        distributed.apply_fsdp(model, expert_mesh=object())
    with pytest.raises(ValueError, match="expert_mesh None with 1 expert_units"):
        distributed.apply_fsdp(model, expert_units=[model[0][0]])
    assert not any(type(m).__name__.startswith("FSDP") for m in model.modules())
