"""A new run never destroys an earlier one: run folders are unique by default, a folder holding
another run's results is refused unless resumed or overwritten on request."""

import json
import os

import pytest

from fastft import rundir
from fastft.config import ConfigError, load_config
from fastft.train import finetune

TINY = {"model": {"config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                             "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2},
                  "patch": False},
        "data": {"max_seq_len": 128, "batch_size": 2, "builtin_examples": 500},
        "train": {"max_steps": 3, "eval_every": 0, "eval_generate": 0, "eval_batches": 1, "eval_before": False},
        "logging": {"quiet": True, "progress_bar": False, "tensorboard": False}}


def _config(run_dir, **sections):
    tree = {k: dict(v) for k, v in TINY.items()}
    for section, values in sections.items():
        tree.setdefault(section, {}).update(values)
    if run_dir is not None:
        tree["logging"]["run_dir"] = str(run_dir)
    return load_config(tree)


def _lines(run_dir):
    return (run_dir / "metrics.jsonl").read_text().splitlines()


def test_a_second_run_into_the_same_folder_is_refused_and_nothing_is_lost(tmp_path):
    first = finetune(_config(tmp_path, checkpoint={"every": 1}))
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match=r"holds the results of an earlier run .*--checkpoint.resume=true.*"
                                          r"--logging.run_dir.*--logging.overwrite=true"):
        finetune(_config(tmp_path, train={"max_steps": 2}))
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before, "the refused run changed the earlier run's files"
    assert first.export_dir and len(_lines(tmp_path)) == len(before[tmp_path / "metrics.jsonl"].splitlines())


def test_overwrite_true_replaces_the_earlier_results_and_keeps_other_files(tmp_path):
    finetune(_config(tmp_path, checkpoint={"every": 1}))
    (tmp_path / "notes.txt").write_text("mine")
    finetune(_config(tmp_path, train={"max_steps": 2}, logging={"overwrite": True}))
    steps = [json.loads(line)["step"] for line in _lines(tmp_path) if json.loads(line)["kind"] == "train"]
    assert steps == [1, 2]  # only the second run's metrics: no mix of two runs
    assert not (tmp_path / "checkpoints").exists(), "the first run's checkpoints were left beside the second run"
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_resume_continues_in_the_same_folder_and_appends(tmp_path):
    finetune(_config(tmp_path, train={"run_steps": 2}, checkpoint={"every": 1}))
    finetune(_config(tmp_path, checkpoint={"resume": True, "every": 1}))
    steps = [json.loads(line)["step"] for line in _lines(tmp_path) if json.loads(line)["kind"] == "train"]
    assert steps == [1, 2, 3]
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "config.resume.yaml").is_file()


def test_resume_without_a_checkpoint_over_finished_results_is_refused(tmp_path):
    finetune(_config(tmp_path))  # checkpoint.every=0: a finished run with no checkpoint
    with pytest.raises(ConfigError, match="no complete checkpoint to continue from"):
        finetune(_config(tmp_path, checkpoint={"resume": True}))


def test_default_run_folders_are_new_per_run_and_latest_points_at_the_newest(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a = finetune(_config(None)).run_dir
    b = rundir._decide(None, resume=False, resume_from=None, overwrite=False)  # within the same second, say
    assert a != b and os.path.dirname(a) == os.path.dirname(b) == "runs"
    assert (tmp_path / a / "metrics.jsonl").is_file() and not os.listdir(b)
    assert os.path.realpath("runs/latest") == os.path.realpath(b)
    # --checkpoint.resume=true without a folder continues the newest run.
    assert rundir._decide(None, resume=True, resume_from=None, overwrite=False) == os.path.realpath(b)


def test_a_run_that_fails_before_its_first_result_leaves_nothing(tmp_path, monkeypatch):
    """A model that cannot be loaded stops the run during set-up: no empty run folder is left, the
    same folder can be used again at once, and runs/latest still names the newest real run."""
    monkeypatch.chdir(tmp_path)
    real = finetune(_config(None)).run_dir
    missing = {"name": str(tmp_path / "no-such-model"), "config": None}
    for run_dir in (None, tmp_path / "mine"):
        with pytest.raises(Exception, match="no-such-model"):
            finetune(_config(run_dir, model=missing))
    assert sorted(os.listdir("runs")) == sorted([os.path.basename(real), "latest"])
    assert os.path.realpath("runs/latest") == os.path.realpath(real)
    assert not (tmp_path / "mine").exists()
    finetune(_config(tmp_path / "mine"))  # not refused: nothing of the failed run is there
    assert (tmp_path / "mine" / "metrics.jsonl").is_file()
