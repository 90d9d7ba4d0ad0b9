"""fastft.finetune from Python: the built-in default, shortened, with a few fields changed.

    python examples/finetune_from_python.py
"""

import fastft
from fastft.config import load_config

config = load_config(None, ["--train.max_steps=60", "--train.eval_every=30", "--logging.run_dir=runs/from_python"])
config.lora.enabled = False  # fields can also be set on the dataclasses; finetune checks them again
result = fastft.finetune(config)
print(result.status, result.steps, "steps; val loss", result.eval_before["val_loss"], "->",
      result.eval_after["val_loss"], "; exported to", result.export_dir)
