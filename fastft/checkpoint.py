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
from typing import NamedTuple

import torch

from fastft import collectives, distributed
from fastft.errors import InputError, MissingInput

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
    collectives.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    model_state = _resumable(model, model_state)
    with warnings.catch_warnings():  # one process without a process group is intended here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp))
    torch.save({"scheduler": scheduler.state_dict(), "data": data_state, "rng": _rng_state()},
               tmp / f"trainer_rank{env.rank}.pt")
    collectives.barrier()
    if env.is_main:
        (tmp / "meta.json").write_text(json.dumps({"step": step, "world_size": env.world_size, "time": time.time()}))
        (tmp / COMPLETE).write_text("")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in complete_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    collectives.barrier()
    return final


def _resumable(model, model_state: dict) -> dict:
    """What a checkpoint keeps of the model: everything, except over a 4-bit base (QLoRA) only the
    trained parameters. The frozen 4-bit base is rebuilt from the recipe on resume (the same
    weights: the same checkpoint or seed), and bitsandbytes writes its quantization state as extra
    state-dict entries that load_state_dict would refuse."""
    from fastft.quantization import is_quantized_model

    if not is_quantized_model(model):
        return model_state
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model_state.items() if k in trained}


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
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    path = pathlib.Path(path)
    meta = verify(path)  # refused here, in plain words, before DCP reads it (inside its own errors)
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": _resumable(model, model_state), "optim": optim_state}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        try:  # every key asked for must be in the checkpoint
            dcp.load(state, storage_reader=_safe_reader(str(path)))
        except (UnsafeCheckpoint, InputError):
            raise
        except Exception as exc:  # DCP wraps what failed (a rank's read) in its own CheckpointException
            raise damaged(path, path, exc) from exc
    options = StateDictOptions(strict=len(state["model"]) == len(model_state))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=options)
    rank_file = path / f"trainer_rank{env.rank}.pt"
    if not rank_file.is_file():
        if meta["world_size"] != env.world_size:
            rank_file = path / "trainer_rank0.pt"  # another world size: model/optimizer reshard, data restarts
        else:
            raise MissingInput("missing from the checkpoint", file=rank_file, fix=_older_fix(path))
    trainer = _load_plain(rank_file)
    scheduler.load_state_dict(trainer["scheduler"])
    if meta["world_size"] == env.world_size:
        _set_rng_state(trainer["rng"])
    return {"step": meta["step"], "data": trainer["data"], "world_size": meta["world_size"]}


class Resumed(NamedTuple):
    step: int  # optimizer steps done before this run
    data: dict  # the data position: {"epoch", "consumed"}
    resumed: bool


def resume(c, run_dir: str, model, optimizer, scheduler, env: distributed.DistEnv, log) -> Resumed:
    """Where a run starts (`c`: the config's checkpoint section): checkpoint.resume_from, or the
    newest complete checkpoint of the run folder when checkpoint.resume is set, loaded into the
    model, optimizer and schedule; else step 0. A checkpoint of another world size resumes its
    weights and step but starts the data over (the ranks' plans differ)."""
    path = c.resume_from or (latest(run_dir) if c.resume else None)
    if c.resume and path is None:
        log(f"resume: no complete checkpoint in {checkpoint_dir(run_dir)}; starting from step 0")
    if path is None:
        return Resumed(0, {"epoch": 0, "consumed": 0}, False)
    state = load(path, model, optimizer, scheduler=scheduler, env=env)
    log(f"resume: {path} (step {state['step']})")
    data = state["data"] if state["world_size"] == env.world_size else {"epoch": 0, "consumed": 0}
    return Resumed(state["step"], data, True)


def save_unless_saved(run_dir: str, step: int, model, optimizer, *, scheduler, data_state: dict, keep: int,
                      env: distributed.DistEnv) -> str:
    """The checkpoint of `step`: the newest complete one when it is of this step, else a new one."""
    saved = latest(run_dir)
    if saved is None or int(saved.name.split("_")[1]) != step:
        saved = save(run_dir, step, model, optimizer, scheduler=scheduler, data_state=data_state, keep=keep, env=env)
    return str(saved)


def verify(path, *, field: str = "checkpoint.resume_from") -> dict:
    """Read through what a resume will read, without a model: COMPLETE, meta.json, DCP's
    .metadata (the safe unpickler), each trainer_rank<r>.pt (plain data only), and every shard
    file's size against the byte ranges .metadata gives (a truncated copy fails here). Returns
    meta.json; raises an InputError naming the file and the fix (or UnsafeCheckpoint)."""
    path = pathlib.Path(path)
    if not path.is_dir():
        raise MissingInput("no such checkpoint folder", file=path, field=field,
                           fix="give a checkpoints/step_XXXXXXXX folder of a run, or drop --" + field)
    if not (path / COMPLETE).is_file():
        raise MissingInput(f"not a complete fastft checkpoint (no {COMPLETE} marker): it was being written when the "
                           "run stopped", file=path, field=field, fix=_older_fix(path))
    try:
        meta = json.loads((path / "meta.json").read_text())
        int(meta["step"]), int(meta["world_size"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise damaged(path / "meta.json", path, exc) from None
    metadata = _read_metadata(path / ".metadata")
    sizes: dict[str, int] = {}
    for info in (getattr(metadata, "storage_data", None) or {}).values():
        name = str(getattr(info, "relative_path", ""))
        if name:
            sizes[name] = max(sizes.get(name, 0), int(info.offset) + int(info.length))
    for name, needed in sorted(sizes.items()):
        file = path / name
        have = file.stat().st_size if file.is_file() else None
        if have is None or have < needed:
            problem = "missing" if have is None else f"truncated ({have} of at least {needed} bytes)"
            raise InputError(f"a shard of the checkpoint is {problem}", file=file, field=field, fix=_older_fix(path))
    for rank_file in sorted(path.glob("trainer_rank*.pt")):
        _load_plain(rank_file)
    return meta


def _older_fix(path: pathlib.Path) -> str:
    """What to resume from instead of the checkpoint `path`: the newest complete one before it."""
    older = [p for p in complete_checkpoints(path.parent.parent) if p.name < path.name] \
        if path.parent.name == "checkpoints" else []
    if older:
        return (f"resume from the checkpoint before it, --checkpoint.resume_from={older[-1]} (or move {path.name} "
                "out of checkpoints/, and --resume takes the newest one left); or start again without --resume")
    return ("no complete checkpoint of this run is older: start again without --resume / --checkpoint.resume_from "
            "(into a new --logging.run_dir, or --logging.overwrite=true)")


def damaged(file, path, exc: BaseException) -> InputError:
    """The InputError for a checkpoint file that cannot be read back (truncated, overwritten, not
    fastft's), with the library's reason in brief."""
    reason = (str(exc).strip().splitlines() or [""])[0].split(". ")[0][:200] or "no message"
    return InputError(f"the checkpoint cannot be read back, it is damaged or truncated ({type(exc).__name__}: "
                      f"{reason})", file=file, fix=_older_fix(pathlib.Path(path)))


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
        state = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        raise _refuse(path, exc) from None
    except Exception as exc:  # a truncated zip (RuntimeError), an empty file (EOFError), ...
        raise damaged(path, path.parent, exc) from None
    if not isinstance(state, dict) or not {"scheduler", "data", "rng"} <= set(state):
        raise damaged(path, path.parent, ValueError("not a fastft trainer state (scheduler, data, rng)"))
    return state


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
        raise _NotAllowed(f"{module}.{name} is not allowed in a checkpoint's metadata")


class _NotAllowed(pickle.UnpicklingError):
    """What _MetadataUnpickler refuses (as against a truncated pickle, pickle's own UnpicklingError)."""


def _read_metadata(path: pathlib.Path):
    try:
        with open(path, "rb") as f:
            return _MetadataUnpickler(f).load()
    except _NotAllowed as exc:
        raise _refuse(path, exc) from None
    except Exception as exc:  # truncated ("pickle data was truncated"), empty (EOFError), missing (OSError)
        raise damaged(path, path.parent, exc) from None


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
    collectives.barrier()
    return out if env.is_main else None


def _save_full(model, state_dict: dict, out: pathlib.Path) -> None:
    # A patched model saves as a plain HF checkpoint (fastft.patching keeps names and config
    # loadable); tied embeddings are written once by save_pretrained itself.
    model.save_pretrained(out, state_dict=state_dict, safe_serialization=True)


def export_merged(out_dir, model, tokenizer, *, env: distributed.DistEnv, dtype=torch.bfloat16) -> pathlib.Path | None:
    """The LoRA adapter merged into its base, as a plain HF folder in `dtype` (checkpoint.export_merged):
    W + s·B·A for every adapted layer, in fp32, a 4-bit base dequantized first (so the folder loads
    without bitsandbytes). Collective under FSDP2 (the state dict is gathered); rank 0 writes."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    out = pathlib.Path(out_dir)
    if env.is_main:
        from transformers import AutoModelForCausalLM

        merged = merged_state_dict(model, {k: v.detach().to("cpu") for k, v in full.items()}, dtype)
        hf = model.get_base_model()
        config = hf.config.__class__.from_dict({k: v for k, v in hf.config.to_dict().items()
                                                 if k != "quantization_config"})
        with torch.device("meta"):
            dense = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                     trust_remote_code=getattr(config, "trust_remote_code", False))
        dense.load_state_dict(merged, strict=True, assign=True)
        dense.tie_weights()
        dense.generation_config = hf.generation_config
        if out.exists():
            shutil.rmtree(out)
        dense.save_pretrained(out, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
    collectives.barrier()
    return out if env.is_main else None


def merged_state_dict(model, full: dict, dtype: torch.dtype) -> dict:
    """The base model's state dict with every LoRA delta added (keys without PEFT's prefixes);
    `full` is the PEFT model's full state dict (for a 4-bit base, the packed weights)."""
    from fastft import quantization
    from fastft.patching.probe import is_lora_layer

    prefix = "base_model.model."
    modules = dict(model.named_modules())
    owned, merged = set(), {}
    for name, module in modules.items():
        if is_lora_layer(module):
            active = [a for a in module.active_adapters if a in module.lora_A.keys()]
            if len(active) != 1 or getattr(module, "lora_variant", {}).get(active[0]) is not None:
                raise ValueError(f"checkpoint.export_merged: {name} has {len(active)} active adapters or a LoRA "
                                 "variant (DoRA...); merge it with PEFT's merge_and_unload instead")
            a = full[f"{name}.lora_A.{active[0]}.weight"].float()
            b = full[f"{name}.lora_B.{active[0]}.weight"].float()
            delta = (b @ a) * float(module.scaling[active[0]])
            base = module.base_layer
            weight = _dense(base, full[f"{name}.base_layer.weight"])
            merged[f"{name}.weight"] = (weight + (delta.t() if getattr(module, "fan_in_fan_out", False) else delta)
                                        ).to(dtype)
            if base.bias is not None:
                merged[f"{name}.bias"] = full[f"{name}.base_layer.bias"].to(dtype)
            owned.add(name + ".")
        elif quantization.is_4bit(module) and not any(name.startswith(o) for o in owned):
            merged[f"{name}.weight"] = _dense(module, full[f"{name}.weight"]).to(dtype)
            owned.add(name + ".weight.")  # bitsandbytes' quantization-state entries
    for key, value in full.items():
        if key in merged or any(key.startswith(o) for o in owned) or ".original_module." in key:
            continue
        if ".modules_to_save." in key:  # PEFT's trained copy of a whole module replaces the original
            head, _, rest = key.partition(".modules_to_save.")
            key = f"{head}.{rest.split('.', 1)[1]}"
        merged[key] = value.to(dtype) if value.is_floating_point() else value
    return {k.removeprefix(prefix): v for k, v in merged.items()}


def _dense(base, weight):
    from fastft import quantization

    return quantization.dense_weight(base, data=weight) if quantization.is_4bit(base) else weight.float()
