"""How whole does the real training path compile? Graph breaks and recompiles, counted by dynamo.

    python -m benchmarks.compile_census [--arch Llama Gemma2 ...] [--steps 4] [--json PATH]

For each architecture: a tiny 2-layer model built from its config, `fastft.patch`ed (fastft's
attention on, as the trainer runs it), in training mode, on the CPU (kernels in Triton's
interpreter, backend aot_eager: the graph is what matters here, not speed).

- whole model: `torch._dynamo.explain` of one forward (the loss) on a plain batch (two rows, one
  document each) and on a packed batch (one row of three documents, with the collator's
  cu_seq_lens / max_length): graph breaks and where they come from (reason, file:line);
- per block, as `distributed.compile=true` runs it (distributed.apply_compile): `steps` packed
  training steps, forward and backward, every row of the same length with documents split
  differently each step (what the trainer's packed batches look like): graph breaks per step and
  the frames dynamo compiled per step. A path that compiles whole has no break and compiles
  nothing after the first step.

Counts, not timings: the numbers do not depend on the machine's load. Issue 25 asks for zero
breaks and zero recompiles on this path; this is its measuring stick.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch  # noqa: E402

DEFAULT_ARCHS = ("Llama", "Gemma2", "Qwen3", "Qwen3Moe", "Bamba")
ROW = 48  # tokens per packed row


def tiny_patched(name: str):
    """A tiny 2-layer model of architecture `name`, fastft.patch'ed, in training mode."""
    from transformers import AutoModelForCausalLM

    import fastft
    from fastft.architectures import NATIVE

    arch = next(a for a in NATIVE if a.name == name)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(arch.tiny_config(num_hidden_layers=2))
    model.config.use_cache = False
    fastft.patch(model)
    return model.train()


def packed_row(lengths) -> dict:
    """One packed row of documents of these lengths, as the trainer's collator makes it (with
    cu_seq_lens / max_length)."""
    from fastft.data import collate_packed, model_inputs

    docs = [{"input_ids": [3 + (i + j) % 90 for j in range(n)], "labels": [-100] + [3 + (i + j) % 90 for j in range(1, n)]}
            for i, n in enumerate(lengths)]
    return model_inputs(collate_packed([docs], pad_id=0))


def _splits(steps: int) -> list[list[int]]:
    """`steps` ways to cut one ROW-token row into documents (3 to 5 of them, seeded)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(steps):
        cuts = sorted((torch.randperm(ROW - 1, generator=g)[: int(torch.randint(2, 5, (1,), generator=g))] + 1).tolist())
        bounds = [0, *cuts, ROW]
        out.append([b - a for a, b in zip(bounds, bounds[1:])])
    return out


def _where(reason) -> str:
    frame = reason.user_stack[-1] if reason.user_stack else None
    return f"{frame.filename.split('/')[-1]}:{frame.lineno}" if frame else "?"


def whole_model(name: str) -> dict:
    model = tiny_patched(name)
    ids = torch.randint(3, 90, (2, 12), generator=torch.Generator().manual_seed(0))
    out = {}
    for kind, batch in (("plain", {"input_ids": ids, "labels": ids.clone()}), ("packed", packed_row([15, 9, 24]))):
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(lambda **b: model(**b).loss)(**batch)
        reasons = collections.Counter(f"{r.reason.splitlines()[0][:80]} @ {_where(r)}" for r in explanation.break_reasons)
        out[kind] = {"breaks": explanation.graph_break_count, "graphs": explanation.graph_count,
                     "reasons": dict(reasons.most_common())}
    return out


def per_block(name: str, steps: int) -> dict:
    from torch._dynamo.utils import counters

    from fastft import distributed

    torch._dynamo.reset()
    counters.clear()
    model = tiny_patched(name)
    distributed.apply_compile(model, backend="aot_eager")
    breaks, frames = [], []
    for lengths in _splits(steps):
        before_breaks, before_frames = sum(counters["graph_break"].values()), counters["frames"]["ok"]
        model(**packed_row(lengths)).loss.backward()
        breaks.append(sum(counters["graph_break"].values()) - before_breaks)
        frames.append(counters["frames"]["ok"] - before_frames)
    reasons = collections.Counter({k.splitlines()[0][:80]: v for k, v in counters["graph_break"].items()})
    return {"breaks_per_step": breaks, "frames_compiled_per_step": frames, "reasons": dict(reasons.most_common())}


def census(archs, steps: int) -> list[dict]:
    import transformers

    rows = []
    for name in archs:
        row = {"arch": name, "torch": torch.__version__, "transformers": transformers.__version__,
               "whole_model": whole_model(name), "per_block": per_block(name, steps)}
        rows.append(row)
        print(_line(row), flush=True)
    return rows


def _line(row: dict) -> str:
    whole, block = row["whole_model"], row["per_block"]
    return (f"{row['arch']}: whole model {whole['plain']['breaks']} breaks (plain), {whole['packed']['breaks']} "
            f"(packed); per block, per step: breaks {block['breaks_per_step']}, frames compiled "
            f"{block['frames_compiled_per_step']}; reasons {sorted(set(whole['packed']['reasons']) | set(block['reasons']))}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=list(DEFAULT_ARCHS), help="architectures (fastft.architectures)")
    parser.add_argument("--steps", type=int, default=4, help="packed training steps of the per-block run")
    parser.add_argument("--json", default="", help="also write the rows here, one JSON object a line")
    args = parser.parse_args(argv)
    rows = census(args.arch, args.steps)
    if args.json:
        with open(args.json, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
