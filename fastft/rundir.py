"""The run folder: where a run's config, metrics, checkpoints and export go, chosen so that a new
run never destroys an earlier one.

- `logging.run_dir` unset (the default): a new folder `runs/<YYYYmmdd-HHMMSS>` for every run, and
  `runs/latest`, a symbolic link to the newest. `--checkpoint.resume=true` without a run folder
  continues the run `runs/latest` points at.
- `logging.run_dir` given: a folder that already holds another run's results (config.yaml,
  metrics.jsonl, checkpoints/, export/, curves.png) stops the new run before any work, unless the
  run resumes it (`checkpoint.resume` / `checkpoint.resume_from`) or `logging.overwrite=true`
  says to delete those results first. Files of other programs in the folder are never touched.
- `claim(config, env)` is the whole of it for a run: a context manager that prepares the folder,
  writes the config (config.yaml, or config.resume.yaml when resuming a run that has one) and
  yields a `RunDir`. A run that stops before its first result (a model that fails to load, a
  dataset missing its columns, a config that cannot be written) leaves nothing behind:
  `discard_unused` removes the config file it wrote, and the folder itself when this run made it
  and it is empty, so the same command can simply be run again (runs/latest goes back to the
  newest remaining run).
- A run folder that cannot be used (the path is a file, a parent cannot be written) and, when
  resuming, a checkpoint that is damaged are refused here, before anything is written (an
  InputError: one line naming the path and the fix), so the earlier run's files keep their bytes.
Under torchrun, rank 0 decides and every rank receives its decision.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import pathlib
import shutil
from collections.abc import Iterator
from typing import NamedTuple

from fastft import checkpoint, collectives, distributed
from fastft.config import ConfigError, to_yaml
from fastft.errors import InputError

RUN_DIR_FIX = ("choose a folder you can write to with --logging.run_dir=..., or leave logging.run_dir unset for a "
               "new runs/<date>-<time> folder")

RUNS = pathlib.Path("runs")
LATEST = "latest"
# What a fastft run writes into its folder (and what logging.overwrite=true deletes).
RESULTS = ("config.yaml", "config.resume.yaml", "metrics.jsonl", "checkpoints", "export", "curves.png",
           "tensorboard")


class RunDir(NamedTuple):
    path: str
    config_file: str  # what this run wrote there: config.yaml, or config.resume.yaml when resuming


@contextlib.contextmanager
def claim(config, env: distributed.DistEnv) -> Iterator[RunDir]:
    """The run folder of `config` with its config written (rank 0 writes); on any exception from
    the body, what this run left there is discarded (`discard_unused`) before it propagates."""
    run_dir = prepare(config, env)
    resumed = bool(config.checkpoint.resume or config.checkpoint.resume_from)
    name = "config.resume.yaml" if resumed and os.path.exists(os.path.join(run_dir, "config.yaml")) else "config.yaml"
    claimed = RunDir(run_dir, name)
    try:
        if env.is_main:
            write_config(run_dir, name, to_yaml(config))
        yield claimed
    except BaseException:
        if env.is_main:  # stopped before its first result: leave no empty run behind
            discard_unused(*claimed)
        raise


def results_in(folder: pathlib.Path) -> list[str]:
    """The names of a fastft run's results present in `folder`."""
    return [name for name in RESULTS if (folder / name).exists()]


def prepare(config, env: distributed.DistEnv) -> str:
    """The run folder for `config` (created, checked, and cleared when overwriting is asked for)."""
    log, ck = config.logging, config.checkpoint
    decision = None
    if env.is_main:
        try:
            decision = _decide(log.run_dir, resume=ck.resume, resume_from=ck.resume_from, overwrite=log.overwrite)
            if isinstance(decision, str):
                _check_resumable(decision, resume=ck.resume, resume_from=ck.resume_from)
        except (InputError, checkpoint.UnsafeCheckpoint) as refused:  # every rank stops, not rank 0 alone
            decision = refused
    decision = collectives.broadcast_object(decision)
    if isinstance(decision, ConfigError):
        raise ConfigError(str(decision))
    if isinstance(decision, Exception):
        raise decision
    return decision


def _check_resumable(run_dir: str, *, resume: bool, resume_from: str | None) -> None:
    """The checkpoint a resumed run will load, read through now (checkpoint.verify): a damaged one
    stops the run before its config file is written beside the earlier run's, and before minutes
    of model loading."""
    path = resume_from or (checkpoint.latest(run_dir) if resume else None)
    if path is not None:
        checkpoint.verify(path, field="checkpoint.resume_from" if resume_from else "checkpoint.resume")


def write_config(run_dir: str, name: str, text: str) -> None:
    """`text` into run_dir/name: a folder that cannot be written is an InputError (one line)."""
    try:
        with open(os.path.join(run_dir, name), "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as exc:
        raise InputError(f"cannot write {name} into the run folder ({exc.strerror or exc})", file=run_dir,
                         field="logging.run_dir", fix=RUN_DIR_FIX) from exc


def _decide(run_dir: str | None, *, resume: bool, resume_from: str | None, overwrite: bool) -> str | ConfigError:
    resuming = bool(resume or resume_from)
    if run_dir is None and resume:
        latest = RUNS / LATEST
        if latest.is_dir():
            return str(latest.resolve())
    if run_dir is None:
        try:
            folder = _new_timestamped_folder()
        except OSError as exc:
            raise InputError(f"cannot make a new run folder here ({exc.strerror or exc})", file=RUNS.absolute(),
                             field="logging.run_dir", fix="run from a folder you can write to, or set "
                             "--logging.run_dir=... to one") from exc
        _point_latest_at(folder)
        return str(folder)
    folder = pathlib.Path(run_dir)
    _refuse_unusable(folder, run_dir)
    found = results_in(folder) if folder.is_dir() else []
    if resume and not resume_from and set(found) - {"config.yaml", "config.resume.yaml"} and not checkpoint.latest(folder):
        return ConfigError(
            f"checkpoint.resume=true: logging.run_dir={run_dir!r} holds an earlier run's results ({', '.join(found)}) "
            "but no complete checkpoint to continue from, so resuming would start again from step 0 over them. "
            "Choose another folder with --logging.run_dir=..., or replace them with --logging.overwrite=true "
            "and no --checkpoint.resume")
    if found and not resuming:
        if not overwrite:
            return ConfigError(
                f"logging.run_dir={run_dir!r} holds the results of an earlier run ({', '.join(found)}); a new run "
                "would overwrite them. Continue that run with --checkpoint.resume=true, choose another folder "
                "with --logging.run_dir=..., leave logging.run_dir unset for a new runs/<date>-<time> folder, "
                "or replace them with --logging.overwrite=true")
        for name in found:
            path = folder / name
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    if not folder.is_dir():
        try:
            folder.mkdir(parents=True)
        except OSError as exc:
            raise InputError(f"cannot make the run folder ({exc.strerror or exc})", file=run_dir,
                             field="logging.run_dir", fix=RUN_DIR_FIX) from exc
        _MADE.add(str(folder))
    return str(folder)


def _refuse_unusable(folder: pathlib.Path, run_dir: str) -> None:
    """A run folder path that is a file (or lies under one), or a folder this process cannot write:
    an InputError now, before anything is written or deleted (os.access is the check, as a probe
    write would change the folder; root passes it, and its writes do succeed)."""
    if folder.exists() and not folder.is_dir():
        raise InputError("is a file, not a folder", file=run_dir, field="logging.run_dir",
                         fix=RUN_DIR_FIX + "; the file is left as it is")
    existing = next((p for p in (folder, *folder.absolute().parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise InputError(f"{existing} is a file, so no folder can be made under it", file=run_dir,
                         field="logging.run_dir", fix=RUN_DIR_FIX)
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        what = "the run folder" if existing == folder else f"{existing}, where the run folder would be made,"
        raise InputError(f"{what} is not writable by this user", file=run_dir, field="logging.run_dir",
                         fix=RUN_DIR_FIX + " (or change the folder's permissions)")


_MADE: set[str] = set()  # run folders this process created


def discard_unused(run_dir: str, config_file: str) -> None:
    """After a failure: remove `config_file` (written by this run into `run_dir`, unless writing it
    failed) when nothing else of this run is there yet, then the folder when this process made it
    and it is now empty."""
    folder = pathlib.Path(run_dir)
    if not folder.is_dir() or set(results_in(folder)) - {config_file}:
        return
    if (folder / config_file).is_file():
        (folder / config_file).unlink()
    if str(folder) in _MADE and not any(folder.iterdir()):
        folder.rmdir()
        _MADE.discard(str(folder))
        latest = RUNS / LATEST
        if latest.is_symlink() and not latest.exists():  # it pointed at the folder just removed
            remaining = sorted(p for p in RUNS.iterdir() if p.is_dir() and not p.is_symlink() and results_in(p))
            latest.unlink()
            if remaining:
                _point_latest_at(remaining[-1])


def _new_timestamped_folder() -> pathlib.Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    RUNS.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        folder = RUNS / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            folder.mkdir()  # fails if another run took this name in the same second
            _MADE.add(str(folder))
            return folder
        except FileExistsError:
            continue
    raise ConfigError(f"{RUNS}: could not make a new run folder for {stamp}; set logging.run_dir")


def _point_latest_at(folder: pathlib.Path) -> None:
    """runs/latest -> folder, replaced atomically (a relative link, so the runs folder can move)."""
    link = RUNS / LATEST
    if link.exists() and not link.is_symlink():
        return  # someone's own folder called "latest": leave it alone
    tmp = RUNS / f".{LATEST}.{os.getpid()}"
    try:
        if tmp.is_symlink():
            tmp.unlink()
        os.symlink(folder.name, tmp, target_is_directory=True)
        os.replace(tmp, link)
    except OSError:  # a file system without symbolic links: the timestamped folder is enough
        if tmp.is_symlink():
            tmp.unlink()
