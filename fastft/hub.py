"""Loading a model, tokenizer or dataset by name, failing in one line that says what to do.

A name is a local folder or a Hugging Face hub id. Offline, transformers and huggingface_hub
retry a connection for tens of seconds and end in a long traceback; here the hub is probed once
(a 3-second TCP connect), and without it loads use the local cache only (`local_files_only`, as
HF_HUB_OFFLINE=1 would), so a name that is not cached fails at once. Any failure becomes a
LoadError naming the config field, the name, what was tried and the fixes.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket

HUB_HOST = "huggingface.co"


class LoadError(RuntimeError):
    """A model, tokenizer or dataset that could not be loaded: the message names the field and the fixes."""


def offline_by_setting() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"))


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connect to the hub (through HTTPS_PROXY's host when one is set), at most `timeout` s."""
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    host, port = HUB_HOST, 443
    if proxy:
        from urllib.parse import urlparse

        parsed = urlparse(proxy)
        host, port = parsed.hostname or host, parsed.port or 443
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def offline_mode():
    """HF_HUB_OFFLINE=1 for this block, for libraries that read it once at import (datasets retries
    each HEAD request for about 20 s otherwise, even with local_files_only)."""
    import datasets
    import huggingface_hub.constants as hub_constants

    saved = hub_constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    hub_constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved


def is_local(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or os.path.exists(os.path.expanduser(name))


def _fixes(name: str, what: str, local: bool, online: bool) -> str:
    if local:
        return (f"a local {what} is a folder holding config.json and the weights/tokenizer files "
                "(save_pretrained writes one); check the path")
    fixes = [f"give a local folder with the {what} (save_pretrained writes one)"]
    if not online:
        fixes.append(f"fill the cache on a machine with network (huggingface-cli download {name}), then run with "
                     "HF_HUB_OFFLINE=1")
    fixes.append("for a gated model (Llama, Gemma), accept its licence on the hub and log in with "
                 "huggingface-cli login (or set HF_TOKEN)")
    fixes.append("check the spelling (org/name)")
    return "; ".join(fixes)


def load(loader, name: str, field: str, what: str, **kwargs):
    """`loader(name, **kwargs)` (e.g. AutoModelForCausalLM.from_pretrained), raising LoadError in
    one line when it fails. Without the hub, only the local cache is tried."""
    local = is_local(name)
    if local and os.path.isdir(os.path.expanduser(name)) and not os.path.isfile(
            os.path.join(os.path.expanduser(name), "config.json")) and what != "tokenizer":
        raise LoadError(f"{field}={name!r}: the folder has no config.json, so it is not a saved {what}; "
                        + _fixes(name, what, True, True))
    online = local or (not offline_by_setting() and hub_reachable())
    if not local and not online:
        kwargs["local_files_only"] = True
    try:
        return loader(os.path.expanduser(name) if local else name, **kwargs)
    except (OSError, ValueError, KeyError, ImportError) as exc:
        tried = ("the local folder" if local else "the hub" if online else
                 "the local Hugging Face cache only (the hub is not reachable" +
                 (", HF_HUB_OFFLINE is set)" if offline_by_setting() else ")"))
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LoadError(f"{field}={name!r}: cannot load the {what} from {tried}: {reason[:300]}. Fixes: "
                        + _fixes(name, what, local, online)) from None


__all__ = ["LoadError", "hub_reachable", "is_local", "load", "offline_by_setting", "offline_mode"]
