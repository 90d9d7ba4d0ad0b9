"""fastft.kernels: fused Triton kernels for fine-tuning. Depends on torch and triton only.

Each op lives in its own file with a plain-torch `*_reference`, Triton forward and backward
kernels, an autograd Function and the functional API exported here.
"""
