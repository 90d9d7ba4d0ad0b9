"""`fastft train` on bad input ends in one line on stderr (file, line, field or column, fix), exit
status 2 and no traceback (unless --debug / FASTFT_DEBUG=1), leaving every file written before
as it was; and a run that stops before train.max_steps exits non-zero with a documented status."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml

from fastft import cli
from fastft.cli import main
from fastft.train import RunResult

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY_LLAMA = dict(model_type="llama", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256)


def recipe(tmp_path, run_dir, **sections) -> str:
    """A YAML recipe of a tiny run (1-layer 16-wide Llama, built-in data, no evaluation, quiet)."""
    tree = {
        "model": {"config": dict(TINY_LLAMA), "patch": False},
        "data": {"max_seq_len": 128, "batch_size": 2, "builtin_examples": 200},
        "train": {"max_steps": 4, "eval_every": 0, "eval_batches": 1, "eval_generate": 0, "eval_before": False},
        "checkpoint": {"export": False},
        "logging": {"run_dir": str(run_dir), "quiet": True, "progress_bar": False, "tensorboard": False,
                    "plot": False},
    }
    for section, values in sections.items():
        tree.setdefault(section, {}).update(values)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree), encoding="utf-8")
    return str(path)


def one_error_line(capsys_or_text) -> str:
    """The single line on stderr (asserting it is one, and no traceback)."""
    err = capsys_or_text if isinstance(capsys_or_text, str) else capsys_or_text.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("fastft train: ") and "Fix" in lines[0], lines[0]
    return lines[0]


def snapshot(folder: pathlib.Path) -> dict:
    """Every file under `folder` with its bytes and modification time (and nothing else there)."""
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


SQUAD_ROWS = [{"id": str(i), "title": "t", "context": f"Ana Bel lives in Port {i}.",
               "question": "Where does Ana Bel live?", "answers": {"text": [f"Port {i}"], "answer_start": [17]}}
              for i in range(5)]


def write_lines(path: pathlib.Path, rows) -> pathlib.Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows),
                    encoding="utf-8")
    return path


@pytest.fixture
def earlier(tmp_path):
    """A run folder holding another program's file, which a refused run must leave as it is."""
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    return folder


# -- data files --------------------------------------------------------------------------------------

@pytest.mark.parametrize("streaming", [False, True])
def test_a_broken_json_line_is_named_by_file_and_line(tmp_path, earlier, capsys, streaming):
    rows = [json.dumps(r) for r in SQUAD_ROWS]
    rows[2] = rows[2][:-7]  # line 3 of 5 cut short
    data = write_lines(tmp_path / "train.jsonl", rows)
    before = snapshot(earlier)
    overrides = [f"--data.source={data}", f"--data.streaming={str(streaming).lower()}"]
    assert main(["train", recipe(tmp_path, earlier), *overrides]) == 2
    line = one_error_line(capsys)
    assert f"{data}:3: data.source: line 3 is not valid JSON" in line and "repair or remove line 3" in line, line
    assert snapshot(earlier) == before


def test_an_empty_data_file_says_so(tmp_path, earlier, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text("")
    before = snapshot(earlier)
    assert main(["train", recipe(tmp_path, earlier), f"--data.source={data}"]) == 2
    line = one_error_line(capsys)
    assert f"{data}: data.source: the file is empty" in line and "--data.source=builtin" in line, line
    assert snapshot(earlier) == before


def test_a_missing_data_file_names_the_path(tmp_path, earlier, capsys):
    before = snapshot(earlier)
    assert main(["train", recipe(tmp_path, earlier), "--data.source=./nowhere/train.jsonl"]) == 2
    line = one_error_line(capsys)
    assert "./nowhere/train.jsonl: data.source:" in line and "does not exist" in line and "check the path" in line
    assert snapshot(earlier) == before


def _without(row: dict, key: str) -> dict:
    return {k: v for k, v in row.items() if k != key}


@pytest.mark.parametrize("case", ["no row has answers", "line 4 has no answers", "sft without prompt"])
def test_rows_without_a_required_column_name_it(tmp_path, earlier, capsys, case):
    data = tmp_path / "train.jsonl"
    overrides = [f"--data.source={data}"]
    if case == "no row has answers":
        write_lines(data, [_without(r, "answers") for r in SQUAD_ROWS])
        expect = [f"{data}: answers: SQuAD-format dataset is missing column(s) ['answers']", "answer_start"]
    elif case == "line 4 has no answers":
        write_lines(data, SQUAD_ROWS[:3] + [_without(SQUAD_ROWS[3], "answers")] + SQUAD_ROWS[4:])
        expect = [f"{data}:4: answers: line 4 has no 'answers'", "add it to every row"]
    else:
        write_lines(data, [{"input": "2 + 2 =", "response": " 4"}] * 5)
        overrides.append("--data.format=sft")
        expect = [f"{data}: prompt: SFT dataset is missing column(s) ['prompt']", "--data.prompt_column=..."]
    before = snapshot(earlier)
    assert main(["train", recipe(tmp_path, earlier), *overrides]) == 2
    line = one_error_line(capsys)
    for text in expect:
        assert text in line, line
    assert snapshot(earlier) == before


# -- run folders ---------------------------------------------------------------------------------------

def test_a_run_folder_that_is_a_file_is_refused(tmp_path, capsys):
    taken = tmp_path / "results.txt"
    taken.write_text("someone's results")
    config = recipe(tmp_path, taken)
    before = snapshot(tmp_path)
    assert main(["train", config]) == 2
    line = one_error_line(capsys)
    assert f"{taken}: logging.run_dir: is a file, not a folder" in line and "--logging.run_dir=..." in line, line
    assert snapshot(tmp_path) == before


def test_an_unwritable_run_folder_is_refused(tmp_path, capsys):
    parent = tmp_path / "locked"
    (parent / "old").mkdir(parents=True)
    (parent / "old" / "metrics.jsonl").write_text("{}\n")
    before = snapshot(parent)
    config = recipe(tmp_path, parent / "run")
    parent.chmod(0o500)
    try:
        probe = parent / ".probe"
        try:  # root (and some file systems) write regardless of the mode bits
            probe.write_text("")
            probe.unlink()
            pytest.skip("this user can write into a folder of mode 0o500 (root?): nothing to refuse")
        except PermissionError:
            pass
        assert main(["train", config]) == 2
        line = one_error_line(capsys)
        assert f"{parent / 'run'}: logging.run_dir:" in line and "not writable" in line, line
        assert snapshot(parent) == before and not (parent / "run").exists()
    finally:
        parent.chmod(0o700)


def test_a_run_folder_the_os_says_is_unwritable_is_refused(tmp_path, capsys, monkeypatch):
    """The same refusal where the test runs as root (mode bits do not stop root): os.access,
    which the run folder check asks, answers as it would for another user."""
    from fastft import rundir

    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "notes.txt").write_text("mine")
    config = recipe(tmp_path, locked)
    before = snapshot(locked)
    access = os.access
    monkeypatch.setattr(rundir.os, "access", lambda p, mode: False if pathlib.Path(p) == locked else access(p, mode))
    assert main(["train", config]) == 2
    line = one_error_line(capsys)
    assert f"{locked}: logging.run_dir: the run folder is not writable by this user" in line, line
    assert snapshot(locked) == before


# -- checkpoints at resume -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A run stopped at train.run_steps=2 of 4 with checkpoints of steps 1 and 2 (exit status 75)."""
    tmp = tmp_path_factory.mktemp("stopped")
    config = recipe(tmp, tmp / "run", train={"run_steps": 2}, checkpoint={"every": 1})
    assert main(["train", config]) == cli.EXIT_RUN_STEPS == 75
    assert (tmp / "run" / "checkpoints" / "step_00000002" / "COMPLETE").is_file()
    return tmp


def _truncate(path: pathlib.Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage", ["trainer_rank0.pt", ".metadata", "shard", "meta.json"])
def test_a_damaged_checkpoint_is_named_at_resume(tmp_path, stopped_run, capsys, damage):
    run = tmp_path / "run"
    shutil.copytree(stopped_run / "run", run)
    step2 = run / "checkpoints" / "step_00000002"
    file = next(step2.glob("*.distcp")) if damage == "shard" else step2 / damage
    _truncate(file)
    before = snapshot(run)
    assert main(["train", recipe(tmp_path, run), "--resume"]) == 2
    line = one_error_line(capsys)
    assert f"{file}: " in line and ("truncated" in line or "damaged" in line), line
    assert f"--checkpoint.resume_from={run / 'checkpoints' / 'step_00000001'}" in line, line
    assert snapshot(run) == before  # no config.resume.yaml, no metrics line, no checkpoint touched


# -- --debug / FASTFT_DEBUG ----------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["--debug", "FASTFT_DEBUG=1"])
def test_debug_adds_the_traceback_before_the_line(tmp_path, capsys, monkeypatch, how):
    argv = ["train", recipe(tmp_path, tmp_path / "run"), "--data.source=./nowhere.jsonl"]
    if how == "--debug":
        argv.append("--debug")
    else:
        monkeypatch.setenv("FASTFT_DEBUG", "1")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "MissingInput" in err
    assert err.strip().splitlines()[-1].startswith("fastft train: ./nowhere.jsonl: data.source:")


def test_a_broken_line_in_a_real_process_is_one_line(tmp_path):
    """`python -m fastft train` as a user runs it: whatever datasets and transformers log goes
    through the same stderr."""
    rows = [json.dumps(r) for r in SQUAD_ROWS]
    rows[2] = "{oops"
    data = write_lines(tmp_path / "train.jsonl", rows)
    out = subprocess.run([sys.executable, "-m", "fastft", "train", recipe(tmp_path, tmp_path / "run"),
                          f"--data.source={data}"], env=_env(), capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-3000:]
    assert f"{data}:3: data.source: line 3 is not valid JSON" in one_error_line(out.stderr)
    assert not (tmp_path / "run").exists()


# -- exit statuses of a stopped run --------------------------------------------------------------------

def test_exit_status_says_why_a_run_ended():
    assert cli.run_exit_status(RunResult(status="finished")) == 0
    assert cli.run_exit_status(RunResult(status="stopped")) == 75
    assert cli.run_exit_status(RunResult(status="interrupted", signal=signal.SIGTERM)) == 143
    assert cli.run_exit_status(RunResult(status="interrupted", signal=signal.SIGINT)) == 130
    assert "143" in cli.EXIT_HELP and "75" in cli.EXIT_HELP and "FASTFT_DEBUG" in cli.EXIT_HELP


def test_a_signal_in_the_last_step_of_run_steps_is_not_a_planned_stop(tmp_path, monkeypatch):
    """SIGTERM during the step that reaches train.run_steps (after that step read the stop flag):
    the run was still stopped by the signal, so it exits 143, not as a planned stop (75) or 0."""
    import fastft.train as train

    step = train.train_step
    calls = []

    def signalled_in_step_2(*args, **kwargs):
        out = step(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return out
    monkeypatch.setattr(train, "train_step", signalled_in_step_2)
    assert main(["train", recipe(tmp_path, tmp_path / "run", train={"max_steps": 6, "run_steps": 2})]) == 143
    end = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert end["kind"] == "end" and end["status"] == "interrupted" and end["step"] == 2
    assert (tmp_path / "run" / "checkpoints" / "step_00000002" / "COMPLETE").is_file()


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTFT_DEBUG")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return env


def test_sigterm_checkpoints_and_exits_143(tmp_path):
    """A scheduler's SIGTERM after the first logged step: checkpoint written, exit status 143."""
    run = tmp_path / "run"
    config = recipe(tmp_path, run, train={"max_steps": 100_000})
    proc = subprocess.Popen([sys.executable, "-m", "fastft", "train", config], env=_env(), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        metrics = run / "metrics.jsonl"
        while not (metrics.is_file() and '"kind": "train"' in metrics.read_text()):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no step logged in 240 s"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-3000:]
    end = json.loads(metrics.read_text().splitlines()[-1])
    assert end["kind"] == "end" and end["status"] == "interrupted" and 1 <= end["step"] < 100_000
    assert pathlib.Path(end["checkpoint"], "COMPLETE").is_file()
