"""fastft: fine-tune Hugging Face causal LMs with fused Triton kernels."""

from __future__ import annotations

import importlib.abc
import importlib.util
import pathlib
import sys

__version__ = "0.1.0"

_CHECKOUT_KERNELS = pathlib.Path(__file__).resolve().parent.parent / "kernels"


class _CheckoutKernelsFinder(importlib.abc.MetaPathFinder):
    """Finds `fastft.kernels` in a source checkout run with PYTHONPATH=. (no install).

    An installed fastft maps kernels/ to fastft.kernels through pyproject's package-dir, and the
    regular finders resolve it first; this one sits last on sys.meta_path and answers only when
    they did not. Importing stays lazy, so TRITON_INTERPRET may still be set after `import fastft`.
    """

    def find_spec(self, name, path=None, target=None):
        if name != "fastft.kernels" or not (_CHECKOUT_KERNELS / "__init__.py").is_file():
            return None
        return importlib.util.spec_from_file_location(
            name, _CHECKOUT_KERNELS / "__init__.py", submodule_search_locations=[str(_CHECKOUT_KERNELS)]
        )


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
