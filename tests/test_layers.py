"""The house imports one way (pyproject.toml's import-linter contracts), counted with the imports
inside functions: the loop is a sink, the builders below it, collectives and the kernels at the
bottom; kernels/ imports no fastft module and no sibling's private name; tests share helpers
through tests/helpers/, never by importing another test module."""

from __future__ import annotations

import ast
import contextlib
import io
import pathlib
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
KERNELS = ROOT / "kernels"
TESTS = ROOT / "tests"

importlinter = pytest.importorskip("importlinter", reason="import-linter is in the test extra")


def _lint(config: pathlib.Path, cwd: pathlib.Path) -> tuple[int, str]:
    """import-linter in a fresh process (its graph is the files' imports, not this process's modules)."""
    code = ("import sys; sys.path.insert(0, '.'); from importlinter.cli import lint_imports; "
            f"sys.exit(lint_imports(config_filename={str(config)!r}, no_cache=True))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


def test_the_package_keeps_its_contracts():
    rc, out = _lint(ROOT / "pyproject.toml", ROOT)
    assert rc == 0, out[-6000:]
    assert "BROKEN" not in out and "KEPT" in out


def test_an_import_inside_a_function_that_points_up_breaks_the_contract(tmp_path):
    """The check can fail: a lower layer importing a higher one inside a function body (what an
    import-time check would miss) is reported."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "high.py").write_text("from pkg import low\n")
    (pkg / "low.py").write_text("def later():\n    from pkg import high\n    return high\n")
    config = tmp_path / ".importlinter"
    config.write_text(textwrap.dedent("""\
        [importlinter]
        root_package = pkg

        [importlinter:contract:layers]
        name = one way
        type = layers
        layers =
            pkg.high
            pkg.low
        """))
    rc, out = _lint(config, tmp_path)
    assert rc != 0 and "BROKEN" in out and "pkg.low -> pkg.high" in out, out[-3000:]


def _imports(path: pathlib.Path):
    """(module or None for a relative import's package, level, imported names) of every import
    statement in the file, function bodies included."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, 0, []
        elif isinstance(node, ast.ImportFrom):
            yield node.module, node.level, [a.name for a in node.names]


KERNEL_DEPENDENCIES = {"torch", "triton", "numpy"}


def test_kernels_import_torch_triton_and_each_other_only():
    """kernels/ is the bottom layer: the standard library, torch, triton and sibling kernel files,
    and from a sibling only public names (a shared helper has a public name in its file)."""
    files = sorted(KERNELS.glob("*.py"))
    assert files and not (KERNELS / "__init__.py").exists()
    problems = []
    for path in files:
        for module, level, names in _imports(path):
            if level:  # a sibling: public names only
                private = [n for n in names if n.startswith("_")] + ([module] if module is None else [])
                if private:
                    problems.append(f"{path.name}: from .{module or ''} import {private}")
            else:
                top = module.split(".")[0]
                if top not in KERNEL_DEPENDENCIES and top not in sys.stdlib_module_names:
                    problems.append(f"{path.name}: import {module}")
    assert not problems, problems


def test_no_test_module_imports_another():
    """Shared test code lives in tests/helpers/ (or tests/numerics.py, the tolerance rule)."""
    test_modules = {p.stem for p in TESTS.glob("test_*.py")}
    problems = []
    for path in sorted(TESTS.rglob("*.py")):
        for module, level, names in _imports(path):
            targets = [module] if module else names
            problems += [f"{path.relative_to(TESTS)} imports {t}" for t in targets
                         if t and t.split(".")[0] in test_modules]
    assert not problems, problems


@pytest.mark.parametrize("folder, limit", [
    ("kernels", 700),
    ("fastft/train.py", 450)])
def test_files_stay_readable(folder, limit):
    """A kernel file under 700 lines (kernels apart from their host code where they grow), and the
    loop within 450 (builders have their own modules)."""
    path = ROOT / folder
    long = {p.name: n for p in ([path] if path.is_file() else sorted(path.glob("*.py")))
            if (n := len(p.read_text().splitlines())) > limit}
    assert not long, long


def test_train_is_imported_only_by_the_cli_and_the_package():
    """The loop is a sink: no module of the package imports fastft.train but the CLI and the
    package's lazy re-export (fastft.finetune)."""
    import grimp

    with contextlib.redirect_stdout(io.StringIO()):
        graph = grimp.build_graph("fastft")
    assert graph.direct_import_exists(importer="fastft", imported="fastft.train")  # inside __getattr__: counted
    assert graph.find_modules_that_directly_import("fastft.train") == {"fastft", "fastft.cli"}
