"""fastft: fine-tune Hugging Face causal LMs with fused Triton kernels."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

__version__ = "0.1.0"


def _load_kernels_from_checkout() -> None:
    """Make `fastft.kernels` importable when running from a source checkout (PYTHONPATH=.).

    An installed fastft maps kernels/ to fastft.kernels through pyproject's package-dir; a bare
    checkout has kernels/ beside fastft/, so load it under its package name here.
    """
    if "fastft.kernels" in sys.modules or importlib.util.find_spec("fastft.kernels") is not None:
        return
    kernels_dir = pathlib.Path(__file__).resolve().parent.parent / "kernels"
    spec = importlib.util.spec_from_file_location(
        "fastft.kernels", kernels_dir / "__init__.py", submodule_search_locations=[str(kernels_dir)]
    )
    if spec is None or spec.loader is None:
        raise ImportError(f"fastft.kernels not found: expected {kernels_dir}/__init__.py; reinstall fastft")
    module = importlib.util.module_from_spec(spec)
    sys.modules["fastft.kernels"] = module
    spec.loader.exec_module(module)


_load_kernels_from_checkout()
