"""The `fastft` command line.

    fastft demo                  run each fused kernel once against its torch reference and print the
                                 errors (on a CPU the kernels run in Triton's interpreter: correct, not fast)
    fastft patch-report MODEL    what fastft.patch would replace in MODEL (a local folder or config.json,
                                 a hub name when online, or a seed architecture's name such as
                                 "Gemma2"), built on the meta device: no weights are loaded

    fastft train [RECIPE] [--section.field=VALUE ...]
                                 fine-tune (no recipe: the built-in default run); --help lists every field
    fastft plot RUN_DIR [RUN_DIR ...]
                                 draw a run's curves.png again, or overlay several runs in one picture
    fastft bench [ARGS]          the end-to-end benchmark (benchmarks/e2e.py; --help for its options),
                                 from a source checkout; --smoke writes to a temporary folder unless --out
    fastft bench --compile-report [ARGS]
                                 every kernel compiled for sm_80/sm_90/sm_100 without a GPU: registers,
                                 spills, shared memory, occupancy (benchmarks/compile_report.py)
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

    from fastft.kernels.fused_linear_cross_entropy import (fused_linear_cross_entropy,
                                                           fused_linear_cross_entropy_reference)
    from fastft.kernels.layer_norm import layer_norm, layer_norm_reference
    from fastft.kernels.rms_norm import rms_norm, rms_norm_reference

    torch.manual_seed(args.seed)
    rows, hidden, vocab = (4096, 4096, 32000) if device == "cuda" else (64, 256, 2048)
    dtype = torch.bfloat16
    print(f"fastft kernel demo on {device} ({'compiled' if device == 'cuda' else 'Triton interpreter'}), "
          f"bf16, N={rows} H={hidden} V={vocab}")
    x = torch.randn(rows, hidden, device=device, dtype=dtype)
    w = torch.rand(hidden, device=device, dtype=dtype) + 0.5
    b = torch.randn(hidden, device=device, dtype=dtype)
    cases = [
        ("rms_norm", lambda: rms_norm(x, w), lambda: rms_norm_reference(x, w)),
        ("rms_norm (gemma)", lambda: rms_norm(x, w, offset=1.0, casting="gemma"),
         lambda: rms_norm_reference(x, w, offset=1.0, casting="gemma")),
        ("layer_norm", lambda: layer_norm(x, w, b), lambda: layer_norm_reference(x, w, b)),
    ]
    head = torch.randn(vocab, hidden, device=device, dtype=dtype) * hidden**-0.5
    labels = torch.randint(0, vocab, (rows,), device=device)
    labels[::3] = -100
    cases.append(("fused_linear_cross_entropy", lambda: fused_linear_cross_entropy(x, head, labels),
                  lambda: fused_linear_cross_entropy_reference(x, head, labels)))
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
    import tempfile

    root = pathlib.Path(__file__).resolve().parent.parent
    if not (root / "benchmarks" / "e2e.py").is_file():
        print(f"fastft bench: benchmarks/ not found beside {root / 'fastft'}; it runs from a source checkout "
              "(git clone, then pip install -e '.[bench]')", file=sys.stderr)
        return 2
    sys.path.insert(0, str(root))
    if args.rest[:1] == ["--compile-report"]:  # compiles for GPU targets: never under the interpreter
        from benchmarks import compile_report

        return compile_report.main(args.rest[1:])
    rest = list(args.rest)
    if "--smoke" in rest and not any(a == "--out" or a.startswith("--out=") for a in rest):
        # A smoke run's timings mean nothing: keep its rows out of benchmarks/results/.
        rest += ["--out", tempfile.mkdtemp(prefix="fastft-bench-smoke-")]
    _prepare_device()
    from benchmarks import e2e

    e2e.main(rest)
    return 0


def plot(args: argparse.Namespace) -> int:
    import pathlib

    from fastft.metrics import plot_runs

    missing = [d for d in args.run_dirs if not (pathlib.Path(d) / "metrics.jsonl").is_file()]
    if missing:
        print(f"fastft plot: no metrics.jsonl in {', '.join(map(repr, missing))}; give fastft run folders "
              "(logging.run_dir, e.g. runs/latest)", file=sys.stderr)
        return 2
    labels = args.labels.split(",") if args.labels else None
    if labels is not None and len(labels) != len(args.run_dirs):
        print(f"fastft plot: {len(labels)} labels for {len(args.run_dirs)} run folders", file=sys.stderr)
        return 2
    out = args.out or (str(pathlib.Path(args.run_dirs[0]) / "curves.png") if len(args.run_dirs) == 1 else "curves.png")
    path = plot_runs(args.run_dirs, out, labels=labels, log=lambda line: print(line, file=sys.stderr))
    if path is None:
        return 1
    print(path)
    return 0


def plan(argv: list[str]) -> int:
    from fastft.planning.__main__ import main as plan_main

    return plan_main(argv)


# Exit statuses of `fastft train`, for scripts and schedulers (README "Exit statuses"; --help).
# Any run that ends before train.max_steps exits non-zero, so that `&&`, `set -e` and a SLURM
# requeue see it is unfinished, and the code says why.
EXIT_FINISHED = 0  # train.max_steps reached (evaluated, exported)
EXIT_BAD_INPUT = 2  # a bad config, data file, run folder or checkpoint: one line on stderr, nothing run
EXIT_FAILED = 3  # the loss diverged, or a checkpoint that could run code was refused
EXIT_RUN_STEPS = 75  # stopped at train.run_steps, checkpointed: `--resume` continues (sysexits' EX_TEMPFAIL)
SIGNAL_BASE = 128  # stopped by a signal, checkpointed: 128 + its number (143 SIGTERM, 130 SIGINT), as shells say

EXIT_HELP = f"""exit status:
  {EXIT_FINISHED}    finished: train.max_steps reached
  {EXIT_BAD_INPUT}    bad input (config, data file, run folder, checkpoint): one line on stderr naming the file,
       line, field and fix; --debug or FASTFT_DEBUG=1 adds the Python traceback
  {EXIT_FAILED}    the loss diverged (NaN/inf), or an unsafe checkpoint was refused
  {EXIT_RUN_STEPS}   stopped at train.run_steps before train.max_steps: checkpoint written, --resume continues
  {SIGNAL_BASE + 15}  stopped by SIGTERM (a scheduler, `timeout`): checkpoint written, --resume continues
  {SIGNAL_BASE + 2}  stopped by SIGINT (Ctrl-C): checkpoint written, --resume continues

"""


def run_exit_status(result) -> int:
    """The exit status of a run that returned (see EXIT_HELP): 0 only when it finished."""
    import signal

    if result.status == "finished":
        return EXIT_FINISHED
    if result.status == "interrupted":  # another rank's signal stopped this one: no number of its own
        return SIGNAL_BASE + int(result.signal or signal.SIGTERM)
    return EXIT_RUN_STEPS


def debug_requested(args: argparse.Namespace) -> bool:
    """--debug, or FASTFT_DEBUG set to anything but empty / 0 / false / no."""
    return bool(getattr(args, "debug", False)) or os.environ.get("FASTFT_DEBUG", "").strip().lower() not in (
        "", "0", "false", "no")


def _refuse(message: str, status: int, debug: bool) -> int:
    """The one line for an error the user can fix (after the traceback, when asked for)."""
    if debug:
        import traceback

        traceback.print_exc()
    print(f"fastft train: {message}", file=sys.stderr)
    return status


def train(args: argparse.Namespace, overrides: list[str]) -> int:
    # On a CPU the fused kernels fall back to their torch references unless TRITON_INTERPRET=1 is
    # set by the user (the interpreter is correct but far too slow for training: ~35 s per step of
    # the default model, measured on 2 cores). So, unlike `demo`, train does not set it.
    from fastft.checkpoint import UnsafeCheckpoint
    from fastft.config import ConfigError, load_config, to_yaml
    from fastft.errors import InputError
    from fastft.hub import LoadError
    from fastft.train import TrainingDiverged, finetune

    debug = debug_requested(args)
    if args.resume:
        overrides = overrides + ["--checkpoint.resume=true"]
    try:
        config = load_config(args.recipe, overrides)
        if args.print_config:
            print(to_yaml(config), end="")
            return 0
        result = finetune(config)
    except ConfigError as exc:
        return _refuse(f"bad config: {exc}", EXIT_BAD_INPUT, debug)
    except (InputError, LoadError) as exc:  # data files, run folders, checkpoints, hub names (fastft/errors.py)
        return _refuse(str(exc), EXIT_BAD_INPUT, debug)
    except (TrainingDiverged, UnsafeCheckpoint) as exc:
        return _refuse(str(exc), EXIT_FAILED, debug)
    except KeyboardInterrupt:  # Ctrl-C before the loop took over the signal, or a second one inside it
        return _refuse("interrupted (Ctrl-C) before a checkpoint of this stop could be written; the newest "
                       "complete one, if any, is kept", SIGNAL_BASE + 2, debug)
    return run_exit_status(result)


def _train_parser(sub) -> argparse.ArgumentParser:
    from fastft.config import help_text

    p_train = sub.add_parser(
        "train", help="fine-tune (no recipe: the built-in default run)", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fine-tune a causal LM: a YAML recipe (see examples/), then --section.field=VALUE overrides "
                    "(VALUE is YAML: 1e-4, true, null, [q_proj, v_proj], {attention: false}).",
        epilog=EXIT_HELP + "config fields (type; default), by section:\n\n" + help_text())
    p_train.add_argument("recipe", nargs="?", default=None, help="a YAML recipe (see examples/)")
    p_train.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    p_train.add_argument("--print-config", action="store_true", help="print the checked config as YAML and exit")
    p_train.add_argument("--debug", action="store_true",
                         help="on bad input, print the Python traceback before the one-line error (or set FASTFT_DEBUG=1)")
    return p_train


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # everything after `bench` belongs to benchmarks/e2e.py
        return bench(argparse.Namespace(rest=argv[1:]))
    if argv[:1] == ["plan"]:  # and after `plan` to fastft/planning/__main__.py
        return plan(argv[1:])
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
    p_train = _train_parser(sub)
    p_plot = sub.add_parser("plot", help="draw curves.png of one run, or overlay several")
    p_plot.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="fastft run folders (holding metrics.jsonl)")
    p_plot.add_argument("--out", default=None, help="the PNG (default: RUN_DIR/curves.png for one run, "
                                                    "./curves.png for several)")
    p_plot.add_argument("--labels", default=None, help="comma-separated legend names, one per run (default: folder names)")
    p_plot.set_defaults(func=plot)
    sub.add_parser("bench", help="end-to-end training benchmark (benchmarks/e2e.py; its own --help)")
    sub.add_parser("plan", help="plan a recipe's GPU memory on this machine (fastft/planning/; its own --help)")
    if argv[:1] == ["train"]:
        from fastft.config import split_overrides

        rest, overrides = split_overrides(argv[1:])
        args = p_train.parse_args(rest)
        return train(args, overrides)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
