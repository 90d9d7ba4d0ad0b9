"""A fresh machine works from the repository root: nothing there shadows a dependency, the kernels
import as fastft.kernels in a checkout and from a wheel, and the commands a newcomer runs first
start. Each check runs in a subprocess started at the root, as a user's `python -m ...` would
(the root first on sys.path), with Hugging Face's `kernels` package installed where it is."""

from __future__ import annotations

import importlib.metadata
import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run_from_root(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**clean, **(env or {})})


def root_import_names() -> dict[str, str]:
    """Every name the root makes importable when it is first on sys.path, and the test modules'
    names (pytest puts tests/ on the path): name -> what it is."""
    names = {}
    for entry in ROOT.iterdir():
        if entry.name.startswith(".") or entry.name.endswith(".egg-info"):
            continue
        if entry.is_dir() and (entry / "__init__.py").is_file():
            names[entry.name] = f"{entry.name}/ (a package)"
        elif entry.is_dir() and any(entry.glob("*.py")):
            names[entry.name] = f"{entry.name}/ (a namespace portion)"
        elif entry.suffix == ".py":
            names[entry.stem] = entry.name
    for module in (ROOT / "tests").glob("*.py"):
        names[module.stem] = f"tests/{module.name}"
    return names


def test_no_root_folder_or_test_module_has_an_installed_distributions_import_name():
    installed = importlib.metadata.packages_distributions()  # top-level import name -> distributions
    clashes = {name: (what, installed[name]) for name, what in root_import_names().items()
               if name in installed and name != "fastft"}
    regular = {name: v for name, v in clashes.items() if "namespace portion" not in v[0]}
    assert not regular, f"these shadow an installed package when run from the root: {regular}"
    # A namespace portion (kernels/ has no __init__.py) loses to any regular package of its name.
    for name in clashes:
        found = run_from_root("-c", f"import {name}; print({name}.__file__)")
        assert found.returncode == 0 and str(ROOT) not in found.stdout, (name, found.stdout, found.stderr)


def test_kernels_folder_is_no_package():
    assert not (ROOT / "kernels" / "__init__.py").exists(), (
        "kernels/__init__.py makes the root's kernels/ shadow Hugging Face's kernels (README, 'Where each part lives')")


def test_transformers_and_fastft_kernels_import_together_from_the_root():
    code = ("import kernels, transformers.modeling_utils\n"
            "from kernels import Mode  # Hugging Face's, which transformers uses\n"
            "import fastft.kernels.rms_norm, fastft.patching\n"
            "print(kernels.__file__); print(fastft.kernels.rms_norm.__file__)\n")
    out = run_from_root("-c", code)
    assert out.returncode == 0, out.stderr
    hf_kernels, ours = out.stdout.split()
    assert str(ROOT) not in hf_kernels
    assert pathlib.Path(ours) == ROOT / "kernels" / "rms_norm.py"


def test_fastft_train_help_from_the_root():
    out = run_from_root("-m", "fastft", "train", "--help")
    assert out.returncode == 0, out.stderr
    assert "model.hub_kernels" in out.stdout and "Traceback" not in out.stderr


def test_pytest_collects_everything_from_the_root():
    out = run_from_root("-m", "pytest", "--co", "-q", "-p", "no:cacheprovider")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert " collected" in out.stdout and "error" not in out.stdout.splitlines()[-1].lower()


def test_bitsandbytes_cpu_4bit_matmul_from_the_root():
    pytest.importorskip("bitsandbytes")
    code = """
import torch, bitsandbytes as bnb, bitsandbytes.functional as F
torch.manual_seed(0)
w = torch.randn(64, 32)
packed, state = F.quantize_4bit(w, quant_type="nf4")
x = torch.randn(5, 32)
out = bnb.matmul_4bit(x, packed.t(), quant_state=state)
ref = x @ F.dequantize_4bit(packed, state).t()
print(((out - ref).norm() / ref.norm()).item())
"""
    out = run_from_root("-c", code, env={"HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    assert "cannot import name" not in out.stderr, out.stderr  # the shadowed `kernels` said this
    assert float(out.stdout.split()[-1]) < 1e-5


def test_the_wheel_holds_every_module_and_imports_outside_the_checkout(tmp_path):
    """pyproject lists the packages by hand (kernels/ maps to fastft/kernels/): a wheel must hold
    every module of the checkout, and import from elsewhere with no checkout on the path."""
    source = tmp_path / "source"  # a copy: setuptools would leave build/ in the checkout, and reuse it
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__", "runs"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = next((tmp_path / "dist").glob("fastft-*.whl"))
    held = {n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".py")}
    expected = {str(p.relative_to(ROOT)) for p in (ROOT / "fastft").rglob("*.py")}
    expected |= {f"fastft/kernels/{p.name}" for p in (ROOT / "kernels").glob("*.py")}
    assert not expected - held, f"missing from the wheel: {sorted(expected - held)}"
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    clean = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", "import fastft.patching, fastft.kernels.rms_norm as k, fastft.data; "
                          "print(k.__file__)"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**clean, "PYTHONPATH": str(site)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(site / "fastft" / "kernels" / "rms_norm.py")
