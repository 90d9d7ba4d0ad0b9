"""The `fastft` command line: demo and patch-report."""

import pathlib

import pytest

from fastft.cli import main

STORIES = pathlib.Path(__file__).resolve().parents[2] / "shared" / "assets" / "models" / "stories260K"


def test_demo_runs_every_kernel(capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    for name in ("rms_norm", "layer_norm", "fused_linear_cross_entropy"):
        assert name in out


def test_patch_report_for_a_seed_architecture(capsys):
    assert main(["patch-report", "Gemma2"]) == 0
    out = capsys.readouterr().out
    assert "Gemma2RMSNorm" in out and "offset=1, casting=gemma" in out and "fused_linear_cross_entropy" in out


@pytest.mark.skipif(not STORIES.is_dir(), reason="shared assets (stories260K) not present")
def test_patch_report_for_a_local_model_folder(capsys):
    assert main(["patch-report", str(STORIES)]) == 0
    assert "LlamaRMSNorm" in capsys.readouterr().out


def test_patch_report_unknown_model_names_the_fix(capsys):
    assert main(["patch-report", "./no-such-model-here"]) == 2
    err = capsys.readouterr().err
    assert "no-such-model-here" in err and "does not exist" in err and "Llama" in err


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "patch-report" in capsys.readouterr().out
