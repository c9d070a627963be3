"""Test-session setup shared by every test module.

Without a GPU, Triton kernels run in triton's interpreter (``TRITON_INTERPRET=1``), which
must be set before triton is first imported; kernel tests compare them with their torch
references on CPU tensors. With a GPU the kernels run for real.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # fp32 convolutions and matmuls in IEEE fp32 (cuDNN defaults to TF32): tests compare with
    # fp32 references at fp32 tolerances
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
