"""Checkpoints (sharded, resumable) and the final export (a plain HF or PEFT folder).

A checkpoint is a folder `<run_dir>/checkpoints/step_00000100/`:
  .metadata, __*.distcp   model + optimizer state, written by torch.distributed.checkpoint (DCP):
                          each rank writes its own shards, in parallel; loads reshard to any world size
  trainer_rank<r>.pt      per rank: the scheduler, the data position (epoch, micro-batches consumed)
                          and the RNG states (python, torch CPU, CUDA), as plain data only (tensors,
                          numbers, strings, lists, dicts): it is read with torch.load(weights_only=True),
                          so a checkpoint from someone else cannot run code when resumed
  meta.json               step, world size, time
  COMPLETE                written last
Atomicity: everything goes to `step_XXXXXXXX.tmp/`; after every rank has finished, rank 0 writes
COMPLETE and renames the folder (os.replace, atomic on a POSIX file system). A folder without
COMPLETE, or still named .tmp, is never resumed from. Multi-node runs need run_dir on a shared
file system (every rank writes into the same folder).

The export is for users, not for resuming: `save_pretrained` from rank 0 with the full
(consolidated) state dict: model weights as safetensors + config + tokenizer for full
fine-tuning; the adapter (adapter_model.safetensors + adapter_config.json) + tokenizer for LoRA.
"""

from __future__ import annotations

import importlib
import json
import os
import pathlib
import pickle
import random
import shutil
import time
import warnings

import torch

from fastft import distributed

COMPLETE = "COMPLETE"


def checkpoint_dir(run_dir: str | os.PathLike) -> pathlib.Path:
    return pathlib.Path(run_dir) / "checkpoints"


def _rng_state() -> dict:
    version, internal, gauss = random.getstate()
    state = {"python": [version, list(internal), gauss], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(run_dir, step: int, model, optimizer, *, scheduler, data_state: dict, keep: int = 2,
         env: distributed.DistEnv) -> pathlib.Path:
    """Write the checkpoint of `step` atomically; delete all but the newest `keep` complete ones."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    root = checkpoint_dir(run_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f"step_{step:08d}.tmp"
    if env.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left by a run that died while writing
            shutil.rmtree(tmp)
        tmp.mkdir()
    distributed.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    with warnings.catch_warnings():  # one process without a process group is intended here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp))
    torch.save({"scheduler": scheduler.state_dict(), "data": data_state, "rng": _rng_state()},
               tmp / f"trainer_rank{env.rank}.pt")
    distributed.barrier()
    if env.is_main:
        (tmp / "meta.json").write_text(json.dumps({"step": step, "world_size": env.world_size, "time": time.time()}))
        (tmp / COMPLETE).write_text("")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in complete_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return final


def complete_checkpoints(run_dir) -> list[pathlib.Path]:
    """Complete checkpoints in `run_dir`, oldest first (half-written ones are ignored)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and not p.name.endswith(".tmp")
             and (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def latest(run_dir) -> pathlib.Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def load(path, model, optimizer, *, scheduler, env: distributed.DistEnv) -> dict:
    """Restore model, optimizer, scheduler and RNG from `path`; returns {"step", "data"}."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = pathlib.Path(path)
    if not (path / COMPLETE).is_file():
        raise FileNotFoundError(f"{path} is not a complete fastft checkpoint (no {COMPLETE} marker): it was "
                                "being written when the run stopped; resume from an older one")
    meta = json.loads((path / "meta.json").read_text())
    _read_metadata(path / ".metadata")  # refused here, in plain words, before DCP reads it (inside its own errors)
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, storage_reader=_safe_reader(str(path)))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rank_file = path / f"trainer_rank{env.rank}.pt"
    if not rank_file.is_file():
        if meta["world_size"] != env.world_size:
            rank_file = path / "trainer_rank0.pt"  # another world size: model/optimizer reshard, data restarts
        else:
            raise FileNotFoundError(f"{rank_file} missing from the checkpoint")
    trainer = _load_plain(rank_file)
    scheduler.load_state_dict(trainer["scheduler"])
    if meta["world_size"] == env.world_size:
        _set_rng_state(trainer["rng"])
    return {"step": meta["step"], "data": trainer["data"], "world_size": meta["world_size"]}


class UnsafeCheckpoint(ValueError):
    """A checkpoint file holds more than plain data: loading it could run code it carries."""


def _refuse(path, exc: Exception) -> UnsafeCheckpoint:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return UnsafeCheckpoint(
        f"{path}: refused to resume from this checkpoint: it holds more than plain data (tensors, numbers, "
        f"strings, lists, dicts, DCP's own metadata), and loading it could run code it carries ({first[:300]}). "
        "fastft never writes such files; if you did not make this checkpoint yourself, do not trust it. To "
        "start without it, drop --checkpoint.resume / --checkpoint.resume_from")


def _load_plain(path: pathlib.Path) -> dict:
    """A trainer state file, refusing anything but plain data (no pickled code is ever run)."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        raise _refuse(path, exc) from None


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's `.metadata` is a pickle (torch's FileSystemReader reads it with plain pickle.load,
    which would run any callable the file names). Only the classes DCP itself writes there are
    let through: its metadata dataclasses and enums, torch.Size, dtypes, layouts, paths."""

    MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")

    def find_class(self, module: str, name: str):
        if module in self.MODULES and isinstance(getattr(importlib.import_module(module), name, None), type):
            return super().find_class(module, name)
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        if (module, name) in {("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                              ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
                              ("pathlib", "PureWindowsPath"), ("collections", "OrderedDict")}:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint's metadata")


def _read_metadata(path: pathlib.Path):
    try:
        with open(path, "rb") as f:
            return _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as exc:
        raise _refuse(path, exc) from None


def _safe_reader(path):
    """torch's FileSystemReader with the metadata read by _MetadataUnpickler."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            rank = kwargs.get("rank")  # newer torch can keep one metadata file per rank
            metadata = _read_metadata(pathlib.Path(self.path) / (".metadata" if rank is None else f"__{rank}.metadata"))
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(path)


def export(out_dir, model, tokenizer, *, env: distributed.DistEnv) -> pathlib.Path | None:
    """A folder that transformers (full fine-tuning) or peft (LoRA) loads alone. Collective: every
    rank takes part in gathering the full state dict; rank 0 writes."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    out = pathlib.Path(out_dir)
    if env.is_main:
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        full = {k: v.detach().to("cpu").contiguous() for k, v in full.items()}
        is_peft = hasattr(model, "peft_config")
        if is_peft:
            # PeftModel.save_pretrained keeps only the adapter's entries of the state dict given.
            model.save_pretrained(out, state_dict=full, safe_serialization=True)
        else:
            _save_full(model, full, out)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
    distributed.barrier()
    return out if env.is_main else None


def _save_full(model, state_dict: dict, out: pathlib.Path) -> None:
    # A patched model saves as a plain HF checkpoint (fastft.patching keeps names and config
    # loadable); tied embeddings are written once by save_pretrained itself.
    model.save_pretrained(out, state_dict=state_dict, safe_serialization=True)
