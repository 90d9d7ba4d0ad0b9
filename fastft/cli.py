"""The `fastft` command line.

    fastft demo                  run each fused kernel once against its torch reference and print the
                                 errors (on a CPU the kernels run in Triton's interpreter: correct, not fast)
    fastft patch-report MODEL    what fastft.patch would replace in MODEL (a local folder or config.json,
                                 a hub name when online, or a seed architecture's name such as
                                 "Gemma2"), built on the meta device: no weights are loaded

    fastft bench [ARGS]          the end-to-end benchmark (benchmarks/e2e.py; --help for its options),
                                 from a source checkout
    fastft plan [RECIPE] [ARGS]  the GPU memory a recipe needs, planned on this machine without a GPU or
                                 weights (fastft/planning/; --help for its options)
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _prepare_device() -> str:
    import torch

    if torch.cuda.is_available():
        return "cuda"
    # Must happen before triton is imported (fastft.kernels imports it lazily).
    os.environ.setdefault("TRITON_INTERPRET", "1")
    return "cpu"


def demo(args: argparse.Namespace) -> int:
    device = _prepare_device()
    import torch

    from fastft import kernels

    torch.manual_seed(args.seed)
    rows, hidden, vocab = (4096, 4096, 32000) if device == "cuda" else (64, 256, 2048)
    dtype = torch.bfloat16
    print(f"fastft kernel demo on {device} ({'compiled' if device == 'cuda' else 'Triton interpreter'}), "
          f"bf16, N={rows} H={hidden} V={vocab}")
    x = torch.randn(rows, hidden, device=device, dtype=dtype)
    w = torch.rand(hidden, device=device, dtype=dtype) + 0.5
    b = torch.randn(hidden, device=device, dtype=dtype)
    cases = [
        ("rms_norm", lambda: kernels.rms_norm(x, w), lambda: kernels.rms_norm_reference(x, w)),
        ("rms_norm (gemma)", lambda: kernels.rms_norm(x, w, offset=1.0, casting="gemma"),
         lambda: kernels.rms_norm_reference(x, w, offset=1.0, casting="gemma")),
        ("layer_norm", lambda: kernels.layer_norm(x, w, b), lambda: kernels.layer_norm_reference(x, w, b)),
    ]
    if hasattr(kernels, "fused_linear_cross_entropy"):
        head = torch.randn(vocab, hidden, device=device, dtype=dtype) * hidden**-0.5
        labels = torch.randint(0, vocab, (rows,), device=device)
        labels[::3] = -100
        cases.append(("fused_linear_cross_entropy", lambda: kernels.fused_linear_cross_entropy(x, head, labels),
                      lambda: kernels.fused_linear_cross_entropy_reference(x, head, labels)))
    print(f"{'kernel':30s} {'max |kernel - torch|':>22s} {'kernel ms':>10s} {'torch ms':>10s}")
    for name, kernel_fn, reference_fn in cases:
        timings = []
        for fn in (kernel_fn, reference_fn):
            fn()  # warm-up: compilation on a GPU
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = fn()
            if device == "cuda":
                torch.cuda.synchronize()
            timings.append((time.perf_counter() - start) * 1e3)
            if fn is kernel_fn:
                kernel_out = out
        err = (kernel_out.float() - out.float()).abs().max().item()
        print(f"{name:30s} {err:22.3e} {timings[0]:10.2f} {timings[1]:10.2f}")
    print("The test suite checks every kernel and gradient against float64: see README.md.")
    return 0


def patch_report(args: argparse.Namespace) -> int:
    _prepare_device()
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from fastft.architectures import ARCHITECTURES
    from fastft.patching import patch

    by_name = {a.name.lower(): a for a in ARCHITECTURES if a.model_type is not None}
    names = ", ".join(sorted(a.name for a in ARCHITECTURES if a.model_type is not None))
    target = args.model
    looks_local = target.startswith(("/", "./", "../", "~")) or os.path.exists(target)
    if target.lower() in by_name:
        config = by_name[target.lower()].tiny_config()
    elif looks_local and not os.path.exists(os.path.expanduser(target)):
        print(f"fastft patch-report: {target!r} does not exist; give a model folder or its config.json, "
              f"a hub name, or one of: {names}", file=sys.stderr)
        return 2
    else:
        try:
            config = AutoConfig.from_pretrained(os.path.expanduser(target) if looks_local else target,
                                                trust_remote_code=args.trust_remote_code)
        except (OSError, ValueError) as exc:
            print(f"fastft patch-report: cannot load a config from {target!r} ({exc}).\n"
                  f"Give a local model folder or config.json, a hub name (online), or one of: {names}",
                  file=sys.stderr)
            return 2
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=args.trust_remote_code)
    print(patch(model))
    return 0


def bench(args: argparse.Namespace) -> int:
    import pathlib

    root = pathlib.Path(__file__).resolve().parent.parent
    if not (root / "benchmarks" / "e2e.py").is_file():
        print(f"fastft bench: benchmarks/ not found beside {root / 'fastft'}; it runs from a source checkout "
              "(git clone, then pip install -e '.[bench]')", file=sys.stderr)
        return 2
    _prepare_device()
    sys.path.insert(0, str(root))
    from benchmarks import e2e

    e2e.main(args.rest)
    return 0


def plan(argv: list[str]) -> int:
    from fastft.planning.__main__ import main as plan_main

    return plan_main(argv)


def train(args: argparse.Namespace, overrides: list[str]) -> int:
    # On a CPU the fused kernels fall back to their torch references unless TRITON_INTERPRET=1 is
    # set by the user (the interpreter is correct but far too slow for training: ~35 s per step of
    # the default model, measured on 2 cores). So, unlike `demo`, train does not set it.
    from fastft.checkpoint import UnsafeCheckpoint
    from fastft.config import ConfigError, load_config
    from fastft.train import TrainingDiverged, finetune

    if args.resume:
        overrides = overrides + ["--checkpoint.resume=true"]
    try:
        config = load_config(args.recipe, overrides)
    except ConfigError as exc:
        print(f"fastft train: bad config: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        from fastft.config import to_yaml

        print(to_yaml(config), end="")
        return 0
    try:
        result = finetune(config)
    except ConfigError as exc:
        print(f"fastft train: bad config: {exc}", file=sys.stderr)
        return 2
    except (TrainingDiverged, UnsafeCheckpoint) as exc:
        print(f"fastft train: {exc}", file=sys.stderr)
        return 3
    return 0 if result.status in ("finished", "stopped") else 130


def _train_args(argv: list[str], parser: argparse.ArgumentParser) -> tuple[argparse.Namespace, list[str]]:
    recipe, resume, show, overrides = None, False, False, []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--resume":
            resume = True
        elif arg == "--print-config":
            show = True
        elif arg.startswith("--"):
            overrides.append(arg)
            if "=" not in arg and i + 1 < len(argv):
                overrides.append(argv[i + 1])
                i += 1
        elif recipe is None:
            recipe = arg
        else:
            parser.error(f"one recipe at most: got {recipe!r} and {arg!r}")
        i += 1
    return argparse.Namespace(recipe=recipe, resume=resume, print_config=show), overrides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastft", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    p_demo = sub.add_parser("demo", help="run the fused kernels once against their references")
    p_demo.add_argument("--seed", type=int, default=0)
    p_demo.set_defaults(func=demo)
    p_report = sub.add_parser("patch-report", help="what fastft.patch would replace in a model (no weights)")
    p_report.add_argument("model", help="local folder or config.json, hub name, or a seed architecture's name")
    p_report.add_argument("--trust-remote-code", action="store_true")
    p_report.set_defaults(func=patch_report)
    sub.add_parser("bench", help="end-to-end training benchmark (benchmarks/e2e.py; its own --help)")
    sub.add_parser("plan", help="plan a recipe's GPU memory on this machine (fastft/planning/; its own --help)")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # everything after `bench` belongs to benchmarks/e2e.py
        return bench(argparse.Namespace(rest=argv[1:]))
    if argv[:1] == ["plan"]:
        return plan(argv[1:])
    p_train = sub.add_parser("train", help="fine-tune (no recipe: the built-in default run)",
                             description="Fine-tune a causal LM. Any config field can be overridden as "
                                         "--section.field=value (sections: model, data, lora, optim, train, "
                                         "distributed, checkpoint, logging).")
    p_train.add_argument("recipe", nargs="?", default=None, help="a YAML recipe (see examples/)")
    p_train.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    p_train.add_argument("--print-config", action="store_true", help="print the checked config as YAML and exit")
    p_train.set_defaults(func=train)
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"] and not {"-h", "--help"} & set(argv):
        # Overrides are split here, not by argparse (which takes "--a.b={x: 1, y: 2}" for a
        # positional because of the spaces).
        return train(*_train_args(argv[1:], p_train))
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
