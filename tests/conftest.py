"""Test-session setup shared by every test module.

Without a GPU, Triton kernels run in triton's interpreter (``TRITON_INTERPRET=1``), which
must be set before triton is first imported; kernel tests compare them with their torch
references on CPU tensors. With a GPU the kernels run for real.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
