"""Every Python and shell block in README.md and examples/README.md is run by this test, so that a
documented call that does not do what it says fails CI.

A block runs as written, in a fresh process, with hub names resolved offline from a fake Hugging
Face cache that this file fills with tiny models of the same architectures (random weights from
the seed's tiny configs), so `fastft.from_pretrained("meta-llama/Llama-3.2-1B", ...)` loads a
tiny Llama. A comment line right before a block changes how it is run:

    <!-- readme-test: check=NAME -->   run it, then run CHECKS[NAME] in the same process: what the
                                       block claims to do (e.g. that a LoRA adapter was applied)
    <!-- readme-test: slow -->         run it in the slow suite only (it takes minutes)
    <!-- readme-test: hub -->          needs the hub's data or weights, or many GPUs: not run, but
    <!-- readme-test: gpu -->          parsed (Python compiled, shell checked by `bash -n`) and every
                                       `fastft train` / `finetune` recipe in it loaded with its
                                       overrides (a wrong field or value fails here)

In shell blocks, `pip install ...` and `python -m pytest ...` are not run: they are exactly what
.ci/run does on every submission (tested below).
"""

from __future__ import annotations

import ast
import dataclasses
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "examples" / "README.md"]
MARKER = re.compile(r"<!--\s*readme-test:\s*(.*?)\s*-->")


@dataclasses.dataclass
class Block:
    doc: str
    line: int
    lang: str
    code: str
    marks: dict

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"


def blocks() -> list[Block]:
    found = []
    for doc in DOCS:
        lines = doc.read_text().splitlines()
        i = 0
        while i < len(lines):
            fence = re.match(r"^```(\w+)\s*$", lines[i])
            if fence and fence.group(1) in ("python", "bash", "sh"):
                start, body = i + 1, []
                i += 1
                while not lines[i].startswith("```"):
                    body.append(lines[i])
                    i += 1
                marks = {}
                above = lines[start - 2] if start >= 2 else ""
                if m := MARKER.search(above):
                    for part in m.group(1).split():
                        key, _, value = part.partition("=")
                        marks[key] = value or True
                found.append(Block(str(doc.relative_to(ROOT)), start, fence.group(1), "\n".join(body) + "\n", marks))
            i += 1
    return found


BLOCKS = blocks()


# -- what blocks claim, checked in the block's own process ----------------------------------------

CHECKS = {
    # README "Patching": from_pretrained patched the model, the report says so, unpatch undid it.
    "patched-and-restored": """
assert report.patched() and report.count("rms_norm") > 0 and report.count("cross_entropy") == 1, str(report)
assert not hasattr(model, "fastft_report"), "unpatch left the report"
assert model.config._attn_implementation != "fastft", "unpatch left the attention"
""",
    # README "Transformers' hub kernels": off by default, on when asked, after fastft's patches, reported.
    "hub-kernels-reported": """
assert not plain.use_kernels and plain.fastft_report.hub_kernels == "off", plain.fastft_report.hub_kernels
assert model.use_kernels and model.fastft_report.hub_kernels.startswith("on ("), model.fastft_report.hub_kernels
assert model.fastft_report.count("rms_norm") > 0
""",
    # README "LoRA": the adapter is applied (a PEFT model, LoRA layers on every linear layer of the
    # decoder, only they train) and routed through the fused kernels.
    "lora-applied": """
import peft
assert isinstance(model, peft.PeftModel), type(model)
trainable = [n for n, p in model.named_parameters() if p.requires_grad]
assert trainable and all("lora_" in n for n in trainable), trainable[:5]
layers = [n for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
assert {n.rsplit(".", 1)[-1] for n in layers} >= {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
assert model.fastft_report.count("lora") > 0 or any(e.replacement.startswith("lora_mlp") for e in model.fastft_report.entries), str(model.fastft_report)
""",
    # README "QLoRA": the linear layers are 4-bit, their LoRA layers (and the MLP blocks) fused.
    "qlora-applied": """
from fastft import quantization
report = model.fastft_report
four_bit = [e for e in report.entries if e.replacement == "lora_linear" and "4-bit nf4" in e.reason]
assert len(four_bit) == sum(quantization.is_4bit(m) for m in model.modules()) > 0, str(report)
assert any(e.replacement.startswith("lora_mlp") for e in report.entries), str(report)
assert not report.skipped("lora"), str(report)
assert "frozen" in model.fastft_quantization[0]
""",
    # README "Mixture of experts": every layer's experts run the grouped kernel, with the experts'
    # LoRA factors fused into it.
    "moe-fused": """
layers = model.config.num_hidden_layers
report = model.fastft_report
assert report.count("moe") == layers, str(report)
assert sum(e.replacement == "moe_experts + LoRA" for e in report.entries) == layers, str(report)
""",
}


# -- the fake hub --------------------------------------------------------------------------------

# Hub names the docs use -> the seed architecture (fastft.architectures) of their tiny stand-in.
HUB_MODELS = {"meta-llama/Llama-3.2-1B": "Llama", "Qwen/Qwen3-8B": "Qwen3", "Qwen/Qwen3-30B-A3B": "Qwen3Moe"}


@pytest.fixture(scope="module")
def fake_hub(tmp_path_factory) -> pathlib.Path:
    """A Hugging Face cache holding tiny random models under the docs' hub names (weights, config,
    and fastft's byte-level tokenizer), read with HF_HUB_OFFLINE=1."""
    import torch
    from transformers import AutoModelForCausalLM

    from fastft.architectures import NATIVE
    from fastft.data import byte_level_tokenizer

    cache = tmp_path_factory.mktemp("hf_cache")
    tokenizer = byte_level_tokenizer()
    for name, arch_name in HUB_MODELS.items():
        arch = next(a for a in NATIVE if a.name == arch_name)
        config = arch.tiny_config()
        config.vocab_size = max(config.vocab_size, len(tokenizer))
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        repo = cache / f"models--{name.replace('/', '--')}"
        snapshot = repo / "snapshots" / ("0" * 40)
        model.save_pretrained(snapshot)
        tokenizer.save_pretrained(snapshot)
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text("0" * 40)
    return cache


def _env(fake_hub: pathlib.Path, bin_dir: pathlib.Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as a user runs it
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HUB_CACHE=str(fake_hub),
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
               PATH=os.pathsep.join([str(bin_dir), env.get("PATH", "")]))
    return env


@pytest.fixture
def workdir(tmp_path) -> pathlib.Path:
    """A folder that looks like the repository root to a block (examples/, benchmarks/), with a
    `fastft` command that runs this checkout (what `pip install -e .` gives a user)."""
    for name in ("examples", "benchmarks"):
        (tmp_path / name).symlink_to(ROOT / name)
    bin_dir = tmp_path / ".bin"
    bin_dir.mkdir()
    (bin_dir / "fastft").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m fastft "$@"\n')
    (bin_dir / "fastft").chmod(0o755)
    return tmp_path


# -- shell commands ------------------------------------------------------------------------------

def commands(code: str) -> list[str]:
    """The block's commands: comments dropped, continuation lines joined, `a && b` split."""
    text = re.sub(r"\\\n\s*", " ", code)
    out = []
    for line in text.splitlines():
        try:
            words = shlex.split(line, comments=True)
        except ValueError:  # not a simple command line (a here-document, say): keep it whole
            out.append(line)
            continue
        group: list[str] = []
        for word in [*words, "&&"]:
            if word == "&&":
                if group:
                    out.append(shlex.join(group))
                group = []
            else:
                group.append(word)
    return out


def covered_by_ci(command: str) -> bool:
    return command.startswith(("pip install", "python -m pytest"))


def train_invocation(command: str) -> tuple[str | None, list[str]] | None:
    """(recipe, overrides) of a `fastft train` / `torchrun ... fastft.cli train` command, else None."""
    words = shlex.split(command)
    if words[:2] == ["fastft", "train"]:
        rest = words[2:]
    elif words[0] == "torchrun" and "fastft.cli" in words and "train" in words:
        rest = words[words.index("train") + 1:]
    else:
        return None
    recipe = next((w for w in rest if not w.startswith("--")), None)
    overrides = [w for w in rest if w.startswith("--") and "." in w.split("=")[0]]
    return recipe, overrides


# -- the tests -----------------------------------------------------------------------------------

def _param(block: Block):
    marks = [pytest.mark.slow] if "slow" in block.marks else []
    return pytest.param(block, id=block.id, marks=marks)


RUN = [_param(b) for b in BLOCKS if not ({"hub", "gpu"} & set(b.marks))]
PARSE_ONLY = [pytest.param(b, id=b.id) for b in BLOCKS if {"hub", "gpu"} & set(b.marks)]


def test_the_docs_have_blocks_and_every_marker_is_known():
    assert len(BLOCKS) >= 8
    for block in BLOCKS:
        assert set(block.marks) <= {"check", "slow", "hub", "gpu"}, (block.id, block.marks)
        if "check" in block.marks:
            assert block.marks["check"] in CHECKS, (block.id, block.marks)
    named = {b.marks.get("check") for b in BLOCKS}
    assert named >= set(CHECKS), f"checks no block uses: {set(CHECKS) - named}"


@pytest.mark.parametrize("block", RUN)
def test_block_runs_and_does_what_it_says(block, fake_hub, workdir):
    env = _env(fake_hub, workdir / ".bin")
    if block.lang == "python":
        code = block.code + CHECKS.get(block.marks.get("check"), "")
        out = subprocess.run([sys.executable, "-c", code], cwd=workdir, env=env, capture_output=True, text=True,
                             timeout=900)
        assert out.returncode == 0, f"{block.id} failed:\n{block.code}\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
        return
    ran = 0
    for command in commands(block.code):
        if covered_by_ci(command):
            continue
        out = subprocess.run(["bash", "-c", command], cwd=workdir, env=env, capture_output=True, text=True,
                             timeout=900)
        assert out.returncode == 0, f"{block.id}: `{command}` failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
        ran += 1
    assert ran or all(covered_by_ci(c) for c in commands(block.code))


@pytest.mark.parametrize("block", PARSE_ONLY)
def test_block_that_needs_the_hub_or_a_gpu_parses_and_its_recipes_load(block):
    from fastft.config import load_config

    recipes = []
    if block.lang == "python":
        tree = ast.parse(block.code)  # a syntax error fails here
        recipes = [(n.value, []) for n in ast.walk(tree)
                   if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value.endswith(".yaml")]
    else:
        subprocess.run(["bash", "-n", "-c", block.code], check=True)
        for command in commands(block.code):
            if (found := train_invocation(command)) is not None:
                recipes.append(found)
    for recipe, overrides in recipes:
        load_config(ROOT / recipe if recipe else None, overrides)  # raises ConfigError naming a bad field
    for command in commands(block.code) if block.lang != "python" else []:
        words = shlex.split(command)
        for word in words:
            if word.startswith(("examples/", "benchmarks/")) and not word.startswith("benchmarks/results"):
                assert (ROOT / word.split(":")[0]).exists(), f"{block.id}: {word} does not exist"


def test_ci_runs_the_readme_test_command_in_a_fresh_environment():
    """.ci/run installs with the README's own command and runs the README's test command, verbatim."""
    first = next(b for b in BLOCKS if b.doc == "README.md")
    ci = (ROOT / ".ci" / "run").read_text()
    install_and_test = [c for c in commands(first.code) if covered_by_ci(c)]
    assert install_and_test, "the README's first block lost its install/test commands"
    ci_commands = commands("\n".join(line for line in ci.splitlines() if not line.lstrip().startswith("#")))
    for command in install_and_test:
        if "[test]" in command or "pytest" in command:
            assert any(c.startswith(command) for c in ci_commands), f".ci/run does not run the README's `{command}`"
    assert "venv" in ci, ".ci/run must build a fresh virtual environment"


def test_python_m_fastft_is_the_fastft_command():
    out = subprocess.run([sys.executable, "-m", "fastft", "--help"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0 and "patch-report" in out.stdout and "train" in out.stdout, out.stderr


def test_from_pretrained_applies_a_lora_config_and_rejects_wrong_option_types(fake_hub, monkeypatch):
    """lora=LoraConfig(...) adds the adapter (the README's call); a value of the wrong type for any
    patch option is an error naming the option, never silently truthy."""
    import torch  # noqa: F401
    from peft import LoraConfig, PeftModel

    import fastft

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(fake_hub))
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(fake_hub))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    model = fastft.from_pretrained("meta-llama/Llama-3.2-1B", lora=LoraConfig(r=4, target_modules="all-linear"))
    assert isinstance(model, PeftModel)
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    with pytest.raises(TypeError, match=r"option lora=LoraConfig.* must be True or False.*get_peft_model"):
        fastft.patch(model.get_base_model(), lora=LoraConfig(r=4))
    with pytest.raises(TypeError, match=r"option rms_norm='yes' must be True or False"):
        fastft.patch(model, rms_norm="yes")
    with pytest.raises(TypeError, match=r"lora=3 must be True/False or a peft config"):
        fastft.from_pretrained("meta-llama/Llama-3.2-1B", lora=3)
