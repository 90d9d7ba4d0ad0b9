"""What several test modules share: recipes for tiny runs (recipes.py), two-process runs under
torchrun (torchrun.py), PEFT LoRA pairs and the kernels' dropout on the reference side (lora.py).
Test modules import from here (or tests/numerics.py, the tolerance rule), never from each other.
"""
