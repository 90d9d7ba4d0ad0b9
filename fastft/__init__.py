"""fastft: fine-tune Hugging Face causal LMs with fused Triton kernels."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import pathlib
import sys

__version__ = "0.1.0"

_CHECKOUT_KERNELS = pathlib.Path(__file__).resolve().parent.parent / "kernels"


class _CheckoutKernelsFinder(importlib.abc.MetaPathFinder):
    """Finds `fastft.kernels` where kernels/ is a folder of the checkout, not a folder in fastft/.

    kernels/ has no __init__.py, so that the repo root shadows no `kernels` package (README,
    "Layout"): fastft.kernels is a namespace package. An installed wheel has it as
    site-packages/fastft/kernels/, which the regular finders resolve first. A checkout run with
    PYTHONPATH=. has it only at the root, and so has an editable install (setuptools' editable
    finder resolves a namespace package under a regular one only at the top level). This finder
    sits last on sys.meta_path and answers only for fastft.kernels, only where the folder holds
    fastft's kernels. Importing stays lazy, so TRITON_INTERPRET may still be set after
    `import fastft`.
    """

    def find_spec(self, name, path=None, target=None):
        if name != "fastft.kernels" or not (_CHECKOUT_KERNELS / "_common.py").is_file():
            return None
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [str(_CHECKOUT_KERNELS)]
        return spec


if not any(isinstance(f, _CheckoutKernelsFinder) for f in sys.meta_path):
    sys.meta_path.append(_CheckoutKernelsFinder())


def __getattr__(name):
    # patch/unpatch/from_pretrained (fastft/patching/) load transformers: import them on first use only.
    if name in ("patch", "unpatch", "from_pretrained", "PatchReport"):
        from fastft import patching as _patching

        return getattr(_patching, name)
    if name in ("finetune", "FinetuneConfig", "load_config"):  # the trainer (fastft/train.py, fastft/config.py)
        from fastft import config as _config, train as _train

        return getattr(_train if name == "finetune" else _config, name)
    if name == "plan":  # the memory planner (fastft/planning/): fastft.plan(config) plans one step
        import importlib

        return importlib.import_module("fastft.planning").plan
    raise AttributeError(f"module 'fastft' has no attribute {name!r}")
