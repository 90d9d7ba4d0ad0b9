"""The config tree: YAML recipes, --section.field=value overrides, and errors that name the field."""

import pytest

from fastft.cli import main
from fastft.config import ConfigError, FinetuneConfig, load_config, parse_overrides, to_yaml


def test_empty_recipe_is_the_builtin_default():
    config = load_config()
    assert isinstance(config, FinetuneConfig)
    assert config.model.name is None and config.model.config["model_type"] == "llama"
    assert config.data.source == "builtin" and config.train.max_steps > 0


def test_yaml_recipe_and_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim:\n  lr: 3e-4\n  betas: [0.9, 0.99]\nlora:\n  enabled: true\n  r: 8\n"
                      "data:\n  max_seq_len: 256\n")
    config = load_config(recipe, ["--optim.lr=1e-4", "--train.max_steps", "7", "--lora.target_modules=[q_proj, v_proj]"])
    assert config.optim.lr == 1e-4 and config.optim.betas == [0.9, 0.99]  # YAML's "3e-4" string is a float here
    assert config.train.max_steps == 7 and config.lora.r == 8 and config.lora.target_modules == ["q_proj", "v_proj"]
    assert config.data.max_seq_len == 256 and config.data.batch_size == FinetuneConfig().data.batch_size
    assert load_config(__import__("yaml").safe_load(to_yaml(config))) == config  # round trip


@pytest.mark.parametrize("overrides, message", [
    (["--train.lr=1e-4"], "train.lr: unknown field; did you mean optim.lr?"),
    (["--optim.learning_rate=1e-4"], "optim.learning_rate: unknown field; did you mean optim.lr"),
    (["--optm.lr=1"], "optm: unknown section; did you mean optim?"),
    (["--optim.lr=fast"], "optim.lr: expected a float, got 'fast'"),
    (["--train.max_steps=2.5"], "train.max_steps: expected an integer, got 2.5"),
    (["--lora.enabled=maybe"], "lora.enabled: expected true/false"),
    (["--optim.schedule=exp"], "optim.schedule='exp': use one of"),
    (["--data.batching=rows"], "data.batching='rows'"),
    (["--train.global_batch_rows=8", "--train.global_batch_tokens=4096"], "train.global_batch_tokens and train.global_batch_rows"),
    (["--optim.warmup_steps=50", "--train.max_steps=10"], "optim.warmup_steps=50 is more than train.max_steps=10"),
    (["--distributed.fsdp=false", "--distributed.cpu_offload=true"], "distributed.cpu_offload"),
    (["--model.name=x", "--model.config={model_type: llama}"], "model.name and model.config are both set"),
    (["--model.config={hidden_size: 8}"], "model.config needs a model_type"),
    (["--data.format=sft"], "train.eval_generate > 0 scores SQuAD EM/F1 and needs data.format='squad'"),
    (["--model.patch_options={rmsnorm: false}"], "model.patch_options: unknown option"),
    (["optim.lr=1"], "overrides look like --section.field=value"),
])
def test_bad_config_names_the_field(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert message in str(info.value)


def test_unknown_section_in_yaml_names_the_field(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"lr: not a section; did you mean optim.lr\?"):
        load_config(recipe)


def test_global_batch_must_divide(tmp_path):
    from fastft.train import batch_plan

    config = load_config(None, ["--data.batch_size=4", "--train.global_batch_rows=10"])
    with pytest.raises(ConfigError, match=r"train.global_batch_rows=10 is not a multiple .* use e.g. 8"):
        batch_plan(config, world_size=1)
    plan = batch_plan(load_config(None, ["--data.batch_size=2", "--train.global_batch_tokens=4096",
                                         "--data.max_seq_len=256"]), world_size=2)
    assert plan["accumulation"] == 4 and plan["global_batch_rows"] == 16 and plan["global_batch_tokens"] == 4096


def test_cli_bad_config_fails_before_any_work(capsys):
    assert main(["train", "--train.lr=1e-4"]) == 2
    err = capsys.readouterr().err
    assert "train.lr: unknown field; did you mean optim.lr?" in err


def test_parse_overrides_values_are_yaml():
    assert parse_overrides(["--a.b=1", "--a.c=[1, 2]", "--d.e=null", "--d.f=hello"]) == {
        "a": {"b": 1, "c": [1, 2]}, "d": {"e": None, "f": "hello"}}


def test_cli_print_config_shows_the_merged_recipe(capsys):
    import pathlib

    recipe = pathlib.Path(__file__).resolve().parents[1] / "examples" / "squad_llama3.2_1b_lora.yaml"
    assert main(["train", str(recipe), "--optim.lr=5e-5", "--model.config={model_type: llama, hidden_size: 8}",
                 "--model.name=null", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "lr: 5.0e-05" in out and "hidden_size: 8" in out and "enabled: true" in out
