"""Recipes for tiny training runs on a CPU (the built-in data, a 2-layer Llama), shared by the trainer's tests."""

import pathlib

# Training curves compound rounding over steps (Adam divides by the gradients' own size), as
# model-level errors compound over layers: the tolerance rule with the factor of the matrix.
FACTOR = 4.0

ROOT = pathlib.Path(__file__).resolve().parents[2]  # the repository root
TINY_LLAMA = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)


def tiny(run_dir, **sections) -> dict:
    """A recipe for a tiny run: 2-layer 32-wide Llama, rows of 128 tokens of the built-in data (1,000
    examples), no generation, quiet."""
    recipe = {
        "model": {"config": dict(TINY_LLAMA), "patch": False},
        "data": {"max_seq_len": 128, "batch_size": 2, "builtin_examples": 1000},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "train": {"max_steps": 6, "eval_every": 0, "eval_batches": 2, "eval_generate": 0, "eval_before": False,
                  "precision": "fp32"},  # fp32 on a GPU too: the comparisons below are tight
        "checkpoint": {"export": False},
        "logging": {"run_dir": str(run_dir), "quiet": True, "progress_bar": False, "tensorboard": False},
    }
    for section, values in sections.items():
        recipe.setdefault(section, {}).update(values)
    return recipe
