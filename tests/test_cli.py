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


@pytest.mark.parametrize("name, offline, expect", [
    ("no-such-org/no-such-model-here", True, "local Hugging Face cache only"),
    ("./not-a-folder-here", False, "the local folder"),
])
def test_a_model_that_cannot_be_loaded_ends_in_one_line(tmp_path, monkeypatch, capsys, name, offline, expect):
    import time

    monkeypatch.chdir(tmp_path)
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    assert main(["train", f"--model.name={name}", "--train.max_steps=1"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert f"model.name={name!r}" in lines[0] and "Fixes:" in lines[0] and expect in lines[0], lines[0]
    assert time.perf_counter() - start < 30  # no retries against an unreachable hub


def test_a_folder_without_config_json_names_the_fix(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights").mkdir()
    assert main(["train", f"--model.name={tmp_path / 'weights'}", "--model.tokenizer=words"]) == 2
    assert "has no config.json" in capsys.readouterr().err


def test_a_dataset_that_cannot_be_loaded_ends_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["train", "--data.source=no-such-org/no-such-dataset", "--model.tokenizer=byte",
                 "--model.config={model_type: llama, hidden_size: 16, intermediate_size: 32, num_hidden_layers: 1, "
                 "num_attention_heads: 2, num_key_value_heads: 2}", "--logging.quiet=true"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "data.source='no-such-org/no-such-dataset'" in lines[0], lines
    assert "data.source=builtin" in lines[0]


def test_bench_smoke_writes_to_a_temporary_folder_unless_out(tmp_path, monkeypatch):
    from benchmarks import e2e

    seen = []
    monkeypatch.setattr(e2e, "main", lambda argv: seen.append(argv))
    main(["bench", "--smoke", "--models", "Llama-3.2-1B"])
    out = seen[-1][seen[-1].index("--out") + 1]
    assert "fastft-bench-smoke-" in out and not out.startswith(str(pathlib.Path(e2e.__file__).parent))
    main(["bench", "--smoke", "--out", str(tmp_path)])
    assert seen[-1] == ["--smoke", "--out", str(tmp_path)]
    main(["bench", "--models", "Llama-3.2-1B"])  # a real run keeps benchmarks/results/ (e2e's default)
    assert "--out" not in seen[-1]


def _metrics(run_dir, shift=0.0):
    import json

    run_dir.mkdir(parents=True)
    lines = [{"kind": "eval", "step": 0, "val_loss": 6.0 + shift, "exact_match": 0.0, "f1": 0.0}]
    for step in range(1, 21):
        lines.append({"kind": "train", "step": step, "loss": 6.0 - 0.2 * step + shift, "lr": 1e-3 * min(1, step / 5),
                      "grad_norm": 1.0, "tokens_per_s": 1000.0 + step, "peak_memory_gib": 0.5,
                      "memory_kind": "cpu_peak_rss"})
    lines.append({"kind": "eval", "step": 20, "val_loss": 2.0 + shift, "exact_match": 40.0 - 10 * shift, "f1": 45.0})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_plot_one_run_and_overlay_several(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    _metrics(tmp_path / "patched")
    _metrics(tmp_path / "unpatched", shift=0.5)
    assert main(["plot", str(tmp_path / "patched")]) == 0
    png = tmp_path / "patched" / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = tmp_path / "both.png"
    assert main(["plot", str(tmp_path / "patched"), str(tmp_path / "unpatched"), "--out", str(out),
                 "--labels", "patched,unpatched"]) == 0
    assert out.stat().st_size > png.stat().st_size / 2
    assert main(["plot", str(tmp_path / "nowhere")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_without_matplotlib_the_run_says_once_how_to_get_it(tmp_path, monkeypatch):
    import builtins

    from fastft import metrics

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    monkeypatch.setattr(metrics, "_told_about_matplotlib", False)
    _metrics(tmp_path / "run")
    said = []
    assert metrics.plot_runs([tmp_path / "run"], tmp_path / "run" / "curves.png", log=said.append) is None
    assert metrics.plot_runs([tmp_path / "run"], tmp_path / "run" / "curves.png", log=said.append) is None
    assert len(said) == 1 and "pip install matplotlib" in said[0] and "fastft plot" in said[0]
