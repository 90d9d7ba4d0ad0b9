"""The config tree: YAML recipes, --section.field=value overrides, and errors that name the field."""

import pytest

from fastft.cli import main
import pathlib

from fastft.config import (SECTIONS, ConfigError, FinetuneConfig, field_docs, load_config, markdown_table,
                           parse_overrides, section_fields, split_overrides, to_yaml, validate)

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Fields whose name and type say all (the rest must have a docstring: --help shows it).
KNOWN_SELF_EXPLANATORY = {"data.train_split", "data.eval_split", "data.system_prompt", "data.buffer_size",
                          "data.eval_batch_size", "lora.dropout", "optim.betas", "optim.eps", "train.seed",
                          "logging.progress_bar"}


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
    (["--optim.lr=fast"], "optim.lr='fast': input should be a valid number"),
    (["--train.max_steps=2.5"], "train.max_steps=2.5: input should be a valid integer"),
    (["--train.max_steps=0"], "train.max_steps=0: input should be greater than 0"),
    (["--lora.enabled=maybe"], "lora.enabled='maybe': input should be a valid boolean"),
    (["--optim.schedule=exp"], "optim.schedule='exp': input should be 'cosine', 'linear' or 'constant'"),
    (["--data.batching=rows"], "data.batching='rows': input should be 'packed', 'flat' or 'padded'"),
    (["--data.batching=flat"], "data.batching='flat' needs data.token_budget"),
    (["--optim.betas=[0.9, 1.5]"], "optim.betas[1]=1.5: input should be less than 1"),
    (["--lora.target_modules={a: 1}"], "lora.target_modules={'a': 1}: expected str | list[str]"),
    (["--model.patch_options={attention: 1}"], "model.patch_options.attention=1: input should be a valid boolean"),
    (["--model.config.hidden_size=8"], "for a mapping field write it whole, e.g. --model.config={hidden_size: VALUE"),
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
    from fastft.config import batch_plan

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


def test_split_overrides_keeps_values_with_spaces():
    argv = ["r.yaml", "--model.config={model_type: llama, hidden_size: 8}", "--resume", "--optim.lr", "1e-4", "-h"]
    assert split_overrides(argv) == (["r.yaml", "--resume", "-h"],
                                     ["--model.config={model_type: llama, hidden_size: 8}", "--optim.lr", "1e-4"])


def test_numbers_for_text_fields_and_empty_sections():
    config = load_config({"data": None, "logging": {"run_dir": 2024}, "optim": {"lr": "3e-4"}})
    assert config.logging.run_dir == "2024" and config.optim.lr == 3e-4
    assert config.data == FinetuneConfig().data  # an empty section is all defaults


def test_a_field_set_in_python_is_checked_again():
    config = load_config()
    config.train.max_steps = "12"
    assert validate(config).train.max_steps == 12
    config.optim.schedule = "exp"
    with pytest.raises(ConfigError, match="optim.schedule='exp'"):
        validate(config)


def test_every_field_is_documented_in_help_and_in_the_readme_table(capsys):
    docs = field_docs()
    assert len(docs) == sum(len(section_fields(s)) for s in SECTIONS) > 60
    undocumented = [f.key for f in docs if not f.doc and f.key not in KNOWN_SELF_EXPLANATORY]
    assert not undocumented, f"fields without a docstring: {undocumented}"
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for f in docs:
        assert f"--{f.key}  ({f.type}; default {f.default})" in out
    assert "--optim.schedule  (cosine | linear | constant; default cosine)" in out
    assert "--train.max_steps  (int > 0; default 300)" in out or "--train.max_steps  (int > 0;" in out
    readme = (ROOT / "examples" / "README.md").read_text()
    assert markdown_table() in readme, "examples/README.md's field table is stale: run python -m fastft.config"


def test_cli_print_config_shows_the_merged_recipe(capsys):
    import pathlib

    recipe = pathlib.Path(__file__).resolve().parents[1] / "examples" / "squad_llama3.2_1b_lora.yaml"
    assert main(["train", str(recipe), "--optim.lr=5e-5", "--model.config={model_type: llama, hidden_size: 8}",
                 "--model.name=null", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "lr: 5.0e-05" in out and "hidden_size: 8" in out and "enabled: true" in out
